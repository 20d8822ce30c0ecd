"""The OpenAI protocol as the node speaks it: typed requests, responses and stream chunks.

Requests are bounded here (lengths, ranges) so FastAPI refuses an out-of-range request with a
400 before it reaches the engine. Responses mirror OpenAI's JSON field for field and in OpenAI's
order, so the `openai` client (and anything that parses its types) reads them unchanged; the
fields FedSeek adds (a model card's `parent` and `sha256`) are ones OpenAI's types keep as extras.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field

from federation.security.refusals import ErrorDetail, ErrorResponse
from node.serving import Constraint, SamplingParams
from node.serving.grammar import unenforced_keywords
from node.serving.sampling import MAX_LOGPROBS

__all__ = [
    "ChatCompletionChoice",
    "ChatCompletionMessage",
    "ChatCompletionRequest",
    "ChatCompletionResponse",
    "ChatCompletionStreamChoice",
    "ChatCompletionStreamResponse",
    "ChatMessage",
    "ChoiceLogprobs",
    "CompletionChoice",
    "CompletionLogprobs",
    "CompletionRequest",
    "CompletionResponse",
    "CompletionStreamResponse",
    "ContentPart",
    "DeltaMessage",
    "ErrorDetail",
    "ErrorResponse",
    "FinishReason",
    "ModelCard",
    "ModelList",
    "Refusal",
    "ResponseFormat",
    "ResponseHead",
    "Sampling",
    "StreamOptions",
    "TokenLogprob",
    "TopLogprob",
    "Usage",
]

INT64 = 2**63
MAX_TOKENS = 2**31 - 1  # a bound for the schema; the engine refuses what exceeds the context (400)

# ---- requests ------------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")  # `include_obfuscation` (padding against length side channels): ignored
    include_usage: bool | None = False


class Refusal(NamedTuple):
    """A request parameter the engine does not implement, as the 400 names it."""

    param: str
    why: str


class Sampling(BaseModel):
    """The generation parameters both OpenAI endpoints share.

    Unknown fields are kept (`extra="allow"`) rather than dropped, so `unsupported()` names them in
    its 400, as OpenAI answers "Unrecognized request argument" (vLLM's extras such as `top_k` are
    refused here, and stay available to a pass-through backend). Every field a client may send as
    null accepts null and means its default."""

    model_config = ConfigDict(extra="allow")
    default_max_tokens: ClassVar[int] = 32
    model: str | None = Field(default=None, max_length=256)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=-INT64, lt=INT64)
    stop: str | list[str] | None = Field(default=None, max_length=4)
    n: int | None = Field(default=None, ge=1, le=128)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    user: str | None = Field(default=None, max_length=512)  # accepted: an end-user id for abuse reports

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def limit(self) -> int | None:
        """The most tokens to generate: the request's, else the default (None: to the end of the context)."""
        return self.max_tokens if self.max_tokens is not None else self.default_max_tokens

    def logprob_count(self) -> int | None:
        """How many alternatives per token the request asks for (None: no logprobs)."""
        return None

    def constraint(self) -> Constraint | None:
        return None

    def unsupported(self) -> list[Refusal]:
        """What the request asks for that the engine does not do (empty: it can be served as asked)."""
        out = [Refusal(name, "not a parameter of this API") for name in sorted(self.model_extra or {})]
        if (self.n or 1) != 1:
            out.append(Refusal("n", "one choice per request (n=1)"))
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                out.append(Refusal(name, "penalties are not implemented (0 only)"))
        if self.logit_bias:
            out.append(Refusal("logit_bias", "logit biases are not implemented"))
        return out

    def params(self) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if any(not s or len(s) > 256 for s in stop):
            raise ValueError("stop: each stop string must have 1 to 256 characters")
        return SamplingParams(
            max_tokens=self.limit(),
            temperature=self.temperature or 0.0,
            top_p=self.top_p if self.top_p is not None else 1.0,
            seed=self.seed,
            stop=tuple(stop),
            logprobs=self.logprob_count(),
            constraint=self.constraint(),
        )


class ContentPart(BaseModel):
    """One part of a message's content array; only `text` parts can be served (images, audio, files:
    refused by name)."""

    model_config = ConfigDict(extra="allow")
    type: str = Field(max_length=64)
    text: str | None = Field(default=None, max_length=100_000)


class ChatMessage(BaseModel):
    """A message as OpenAI's clients send it. `developer` is the system role of newer OpenAI models
    (the template gets `system`); fields the template cannot use (`name`, an echoed `refusal` or
    `reasoning_content`) are ignored; tool and audio turns are refused by `unsupported`."""

    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Annotated[str, Field(max_length=100_000)] | Annotated[list[ContentPart], Field(max_length=256)] | None = (
        None
    )

    def text(self) -> str:
        """The content as the chat template gets it: text parts joined by newlines (as vLLM does)."""
        if isinstance(self.content, list):
            return "\n".join(p.text or "" for p in self.content if p.type == "text")
        return self.content or ""

    def for_template(self) -> dict[str, str]:
        return {"role": "system" if self.role == "developer" else self.role, "content": self.text()}

    def unsupported(self, i: int) -> list[Refusal]:
        where = f"messages[{i}]"
        out = []
        if self.role in ("tool", "function"):
            out.append(Refusal(f"{where}.role", f"'{self.role}' messages need tool calls, which are not implemented"))
        extra = self.model_extra or {}
        for name in ("tool_calls", "function_call", "audio"):
            if extra.get(name):
                out.append(Refusal(f"{where}.{name}", "not implemented"))
        if isinstance(self.content, list):
            kinds = sorted({p.type for p in self.content if p.type != "text"})
            if kinds:
                out.append(Refusal(f"{where}.content", f"only text parts are served, not {', '.join(kinds)}"))
        elif self.content is None and self.role != "assistant":
            out.append(Refusal(f"{where}.content", "a message needs content"))
        return out


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: str = Field(default="response", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """`{"type": "text"}`, `{"type": "json_object"}` or `{"type": "json_schema", "json_schema": {...}}`;
    the JSON ones are held by constrained decoding (node/serving/grammar.py)."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


# Parameters of OpenAI's chat API that are accepted but change nothing here, and why:
#   user, safety_identifier: end-user ids for OpenAI's abuse monitoring; the audit trail records the caller.
#   metadata: tags for stored completions; nothing is stored (see `store`), so they have no effect.
#   prompt_cache_key: a routing hint for OpenAI's prompt cache; there is none to route.
#   parallel_tool_calls: meaningful only with tools, which are refused.
#   service_tier "auto"/"default": the standard tier, which is the only one here ("flex", "priority": refused).
#   store false: nothing is stored; store true (keep the completion for OpenAI's dashboard/evals): refused.
#   tool_choice / function_call "none": no tool is called, as without them; anything else: refused.
#   modalities ["text"]: what is served; any other modality: refused.
class ChatCompletionRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    audio: dict[str, Any] | None = None
    modalities: list[str] | None = None
    prediction: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    web_search_options: dict[str, Any] | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    safety_identifier: str | None = Field(default=None, max_length=512)
    prompt_cache_key: str | None = Field(default=None, max_length=512)

    def limit(self) -> int | None:
        """`max_completion_tokens` (OpenAI's current name, which LangChain sends) wins over the deprecated
        `max_tokens`. Without either, a structured answer may run to the end of the context (a JSON
        value cut at 32 tokens is useless; its grammar ends it), free text gets the default."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        if self.max_tokens is not None:
            return self.max_tokens
        return None if self.constraint() is not None else self.default_max_tokens

    def logprob_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def constraint(self) -> Constraint | None:
        fmt = self.response_format
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            return Constraint.json_object()
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise ValueError("response_format: json_schema needs `json_schema.schema`")
        return Constraint.json_schema(fmt.json_schema.schema_)

    def unsupported(self) -> list[Refusal]:
        out = super().unsupported()
        for i, m in enumerate(self.messages):
            out += m.unsupported(i)
        if self.top_logprobs is not None and not self.logprobs:
            out.append(Refusal("top_logprobs", "needs logprobs: true"))
        if self.tools:
            out.append(Refusal("tools", "tool calling is not implemented"))
        if self.functions:
            out.append(Refusal("functions", "function calling is not implemented"))
        for name in ("tool_choice", "function_call"):
            if getattr(self, name) not in (None, "none"):
                out.append(Refusal(name, "tool calling is not implemented"))
        for name in ("audio", "prediction", "reasoning_effort", "verbosity", "web_search_options"):
            if getattr(self, name) is not None:
                out.append(Refusal(name, "not implemented"))
        if self.modalities and set(self.modalities) != {"text"}:
            out.append(Refusal("modalities", "text only"))
        if self.store:
            out.append(Refusal("store", "completions are not stored (the audit trail keeps digests only)"))
        if self.service_tier not in (None, "auto", "default"):
            out.append(Refusal("service_tier", "one tier only ('auto' / 'default')"))
        fmt = self.response_format
        schema = fmt.json_schema.schema_ if fmt is not None and fmt.json_schema is not None else None
        if fmt is not None and fmt.type == "json_schema" and schema is None:
            out.append(Refusal("response_format.json_schema.schema", "a json_schema format needs its schema"))
        if schema is not None and fmt is not None and fmt.json_schema is not None and fmt.json_schema.strict:
            for where, keyword in unenforced_keywords(schema):  # strict promises every keyword holds
                why = f"'{keyword}' is not enforced here; strict: true needs every keyword to hold (or strict: false)"
                out.append(Refusal(f"response_format.json_schema.schema{where}", why))
        return out


class CompletionRequest(Sampling):
    default_max_tokens: ClassVar[int] = 16  # OpenAI's default for legacy completions
    prompt: str | list[Annotated[int, Field(ge=0, lt=2**31)]] = Field(min_length=1, max_length=100_000)
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool | None = None
    best_of: int | None = Field(default=None, ge=1, le=20)
    suffix: str | None = Field(default=None, max_length=100_000)

    def logprob_count(self) -> int | None:
        return self.logprobs

    def unsupported(self) -> list[Refusal]:
        out = super().unsupported()
        if self.echo:
            out.append(Refusal("echo", "echoing the prompt is not implemented"))
        if (self.best_of or 1) != 1:
            out.append(Refusal("best_of", "one candidate per request (best_of=1)"))
        if self.suffix:
            out.append(Refusal("suffix", "insertion (suffix) is not implemented"))
        return out


# ---- responses -----------------------------------------------------------------------------------

FinishReason = Literal["stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, *, prompt_tokens: int, completion_tokens: int) -> Usage:
        total = prompt_tokens + completion_tokens
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=total)


class ResponseHead(BaseModel):
    """What every completion response and stream chunk starts with."""

    id: str
    created: int
    model: str


class TopLogprob(BaseModel):
    """A token and its log-probability as OpenAI shows it: text (U+FFFD for part of a character) and bytes."""

    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    """A chat choice's `logprobs`: one entry per output token (reasoning included), in order."""

    content: list[TokenLogprob] | None
    refusal: list[TokenLogprob] | None = None


class CompletionLogprobs(BaseModel):
    """A text completion's `logprobs` (the legacy shape): top alternatives as {token: logprob},
    `text_offset` each token's character offset in the completion text."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class ChatCompletionMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: None = None
    # the reasoning block of an R1-style answer (node/api/reasoning.py), as DeepSeek's API and vLLM name it
    reasoning_content: str | None = Field(default=None, exclude_if=lambda v: v is None)


class ChatCompletionChoice(BaseModel):
    index: int = 0
    message: ChatCompletionMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None


class ChatCompletionResponse(ResponseHead):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatCompletionChoice]
    usage: Usage
    system_fingerprint: str  # the first 16 hex digits of the request's audit record hash


class DeltaMessage(BaseModel):
    """A stream chunk's increment: the role in the first chunk only, no text in the finishing one."""

    role: Literal["assistant"] | None = Field(default=None, exclude_if=lambda v: v is None)
    content: str | None = Field(default=None, exclude_if=lambda v: v is None)
    reasoning_content: str | None = Field(default=None, exclude_if=lambda v: v is None)


class ChatCompletionStreamChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionStreamResponse(ResponseHead):
    """A chat stream chunk. `usage` is present (null until the last chunk) only when the request
    asked for it with `stream_options.include_usage`; the serializer leaves it out otherwise."""

    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatCompletionStreamChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None


class CompletionResponse(ResponseHead):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: str


class CompletionStreamResponse(ResponseHead):
    """A text stream chunk (OpenAI names its object as it names a whole text completion)."""

    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    """A model this node serves: the base model, or an adapter version with its lineage and digest."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    parent: str | None  # the version (or base model) this one was trained from; None for the base
    sha256: str | None = Field(default=None, exclude_if=lambda v: v is None)  # adapters only
    # A node's gray release (node/release.py); absent from `fedseek serve`, which has none.
    status: Literal["stable", "candidate", "retired"] | None = Field(default=None, exclude_if=lambda v: v is None)
    share: float | None = Field(default=None, exclude_if=lambda v: v is None)  # of default traffic, now


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
