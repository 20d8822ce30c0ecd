"""The OpenAI protocol as the node speaks it: typed requests, responses and stream chunks.

Requests are bounded here (lengths, ranges) so FastAPI refuses an out-of-range request with a
400 before it reaches the engine. Responses mirror OpenAI's JSON field for field and in OpenAI's
order, so the `openai` client (and anything that parses its types) reads them unchanged; the
fields FedSeek adds (a model card's `parent` and `sha256`) are ones OpenAI's types keep as extras.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from federation.security.refusals import ErrorDetail, ErrorResponse
from node.serving import SamplingParams

__all__ = [
    "ChatCompletionChoice",
    "ChatCompletionMessage",
    "ChatCompletionRequest",
    "ChatCompletionResponse",
    "ChatCompletionStreamChoice",
    "ChatCompletionStreamResponse",
    "ChatMessage",
    "CompletionChoice",
    "CompletionRequest",
    "CompletionResponse",
    "CompletionStreamResponse",
    "DeltaMessage",
    "ErrorDetail",
    "ErrorResponse",
    "FinishReason",
    "ModelCard",
    "ModelList",
    "ResponseHead",
    "Sampling",
    "StreamOptions",
    "Usage",
]

INT64 = 2**63

# ---- requests ------------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class Sampling(BaseModel):
    """The generation parameters both OpenAI endpoints share."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = Field(default=None, max_length=256)
    max_tokens: int = Field(default=32, ge=1, le=4096)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=-INT64, lt=INT64)
    stop: str | list[str] | None = Field(default=None, max_length=4)
    n: int = Field(default=1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def params(self) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if any(not s or len(s) > 256 for s in stop):
            raise ValueError("stop: each stop string must have 1 to 256 characters")
        return SamplingParams(
            max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p, seed=self.seed, stop=tuple(stop)
        )


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=100_000)


class ChatCompletionRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)


class CompletionRequest(Sampling):
    max_tokens: int = Field(default=16, ge=1, le=4096)
    prompt: str | list[Annotated[int, Field(ge=0, lt=2**31)]] = Field(min_length=1, max_length=100_000)


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


class ChatCompletionMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatCompletionChoice(BaseModel):
    index: int = 0
    message: ChatCompletionMessage
    logprobs: None = None
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


class ChatCompletionStreamChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    logprobs: None = None
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
    logprobs: None = None
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
