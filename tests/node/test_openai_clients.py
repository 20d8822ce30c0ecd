"""The OpenAI API as clients use it: the real `openai` client and LangChain's `ChatOpenAI` against a node.

One server for the module (`create_serving_app` on uvicorn on loopback, the tiny DeepSeek-V3 on the
MLA runner, as tests/node/test_openai_api.py builds it): `max_completion_tokens`, structured output by
constrained decoding (`response_format`), 400s that name what the engine does not implement,
content-part arrays and the `developer` role, logprobs checked against a Hugging Face forward, and
the R1 reasoning block as `reasoning_content`.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import openai
import pytest
import torch
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field

from node.serving import Constraint
from tests.node.openai_server import USER, Site, served_site

torch.set_num_threads(2)


class Triage(BaseModel):
    urgency: Literal["routine", "urgent", "emergency"]
    admit: bool


@pytest.fixture(scope="module")
def site(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    with served_site(tmp_path_factory.mktemp("openai-clients"), tiny_model_dir) as s:
        yield s


@pytest.fixture
def client(site: Site) -> openai.OpenAI:
    return site.client(timeout=120)


@pytest.fixture
def base(site: Site) -> str:
    return site.host.model_name


# ---- max_completion_tokens -----------------------------------------------------------------------


def test_max_completion_tokens_is_honoured_and_wins_over_max_tokens(client: openai.OpenAI, base: str) -> None:
    out = client.chat.completions.create(model=base, messages=USER, max_completion_tokens=5)  # type: ignore[arg-type]
    assert out.usage is not None and out.usage.completion_tokens <= 5
    assert out.choices[0].finish_reason == "stop" or out.usage.completion_tokens == 5
    both = client.chat.completions.create(  # type: ignore[call-overload]
        model=base, messages=USER, max_tokens=20, max_completion_tokens=3
    )
    assert both.usage is not None and both.usage.completion_tokens <= 3
    stream = client.chat.completions.create(  # type: ignore[call-overload]
        model=base, messages=USER, max_completion_tokens=4, stream=True, stream_options={"include_usage": True}
    )
    (usage,) = [c.usage for c in stream if c.usage]
    assert usage.completion_tokens <= 4


# ---- structured output ---------------------------------------------------------------------------


def test_json_schema_output_parses_into_the_schema(client: openai.OpenAI, base: str) -> None:
    out = client.chat.completions.parse(model=base, messages=USER, response_format=Triage, max_completion_tokens=64)  # type: ignore[arg-type]
    parsed = out.choices[0].message.parsed
    assert isinstance(parsed, Triage), out.choices[0].message.content
    assert out.choices[0].finish_reason == "stop"


def test_json_object_is_held_to_an_object(client: openai.OpenAI, base: str) -> None:
    """The random tiny model, once inside a free-text string, never picks a closing quote among its 129k
    tokens, so here the answer is cut by the length limit; that it is an object so far is what the
    grammar guarantees (tests/node/serving/test_grammar.py finishes one on a model that can)."""
    out = client.chat.completions.create(  # type: ignore[call-overload]
        model=base, messages=USER, response_format={"type": "json_object"}, max_tokens=12
    )
    text = out.choices[0].message.content
    assert text.startswith('{"') or text in ("{}", "{ }"), text
    if out.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


def test_bad_response_formats_are_400(client: openai.OpenAI, base: str) -> None:
    for fmt in (
        {"type": "json_schema", "json_schema": {"name": "any", "schema": {}}},  # any JSON: too costly to compile
        {"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "nonsense"}}},
        {"type": "json_schema", "json_schema": {"name": "none"}},
    ):
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=base, messages=USER, response_format=fmt)  # type: ignore[call-overload]
        assert "response_format" in str(err.value)


class Dose(BaseModel):
    """A pydantic model with a numeric bound: its JSON schema carries `minimum` on `mg`."""

    mg: int = Field(ge=1)


def test_a_strict_schema_with_a_keyword_not_enforced_is_refused_by_name(client: openai.OpenAI, base: str) -> None:
    """Constrained decoding here does not hold `minimum` (outlines leaves it out): under `strict: true`, which
    promises every keyword, the request is refused naming it; without `strict` it is served, best effort."""
    schema = Dose.model_json_schema()
    strict = {"type": "json_schema", "json_schema": {"name": "dose", "schema": schema, "strict": True}}
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=base, messages=USER, response_format=strict, max_tokens=8)  # type: ignore[call-overload]
    assert err.value.code == "unsupported_parameter"
    assert err.value.param == "response_format.json_schema.schema.properties.mg"
    assert "'minimum' is not enforced here" in err.value.message
    loose = {"type": "json_schema", "json_schema": {"name": "dose", "schema": schema}}
    out = client.chat.completions.create(model=base, messages=USER, response_format=loose, max_tokens=8)  # type: ignore[call-overload]
    assert out.choices[0].message.content is not None and out.choices[0].message.content.startswith("{")


# ---- refused and accepted parameters -------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
        ({"n": 2}, "n"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"frequency_penalty": -1.0}, "frequency_penalty"),
        ({"logit_bias": {"42": 5}}, "logit_bias"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
        ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
        ({"reasoning_effort": "high"}, "reasoning_effort"),
        ({"store": True}, "store"),
        ({"top_logprobs": 2}, "top_logprobs"),  # without logprobs: true
        ({"extra_body": {"top_k": 5}}, "top_k"),  # not an OpenAI parameter at all
    ],
)
def test_unimplemented_parameters_are_refused_by_name(
    client: openai.OpenAI, base: str, kwargs: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=base, messages=USER, max_tokens=2, **kwargs)  # type: ignore[call-overload]
    assert err.value.code == "unsupported_parameter" and err.value.param == param
    assert param in err.value.message


def test_text_completion_refusals(client: openai.OpenAI, base: str) -> None:
    for kwargs, param in (({"echo": True}, "echo"), ({"best_of": 3}, "best_of"), ({"suffix": "end"}, "suffix")):
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model=base, prompt="Triage:", max_tokens=2, **kwargs)  # type: ignore[call-overload]
        assert err.value.param == param


def test_harmless_parameters_are_accepted(client: openai.OpenAI, base: str) -> None:
    out = client.chat.completions.create(  # type: ignore[call-overload]
        model=base,
        messages=USER,
        max_tokens=2,
        user="clinician-7",
        metadata={"ward": "a"},
        store=False,
        service_tier="auto",
        parallel_tool_calls=False,
        tool_choice="none",
        modalities=["text"],
        presence_penalty=0,
        n=1,
        safety_identifier="u-1",
        prompt_cache_key="k",
    )
    assert out.choices[0].finish_reason in ("stop", "length")


# ---- messages --------------------------------------------------------------------------------------


def test_content_parts_and_the_developer_role(client: openai.OpenAI, base: str) -> None:
    parts = [
        {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "Chest pain"}, {"type": "text", "text": "since today."}]},
    ]
    plain = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Chest pain\nsince today."}]
    a = client.chat.completions.create(model=base, messages=parts, max_tokens=6)  # type: ignore[arg-type]
    b = client.chat.completions.create(model=base, messages=plain, max_tokens=6)  # type: ignore[arg-type]
    assert a.choices[0].message.content == b.choices[0].message.content  # greedy: the same prompt
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=base, messages=image, max_tokens=2)  # type: ignore[arg-type]
    assert err.value.param == "messages[0].content" and "image_url" in err.value.message


# ---- logprobs ---------------------------------------------------------------------------------------


def reference_logprobs(site: Site, prompt_ids: list[int], out_ids: list[int]) -> torch.Tensor:
    """Hugging Face's own forward of the base model, teacher-forced: log_softmax at each output position."""
    ids = torch.tensor([prompt_ids + out_ids])
    with torch.no_grad(), site.host.peft.disable_adapter():
        logits = site.host.peft(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1]
    return torch.log_softmax(logits.float(), dim=-1)


def ids_of(site: Site, raw: list[bytes]) -> list[int]:
    table = site.serving.engine.grammars.table()
    by_bytes = {b: i for i, b in enumerate(table.bytes) if b is not None}
    return [by_bytes[b] for b in raw]


def test_chat_logprobs_match_a_hf_forward_and_stream_the_same(client: openai.OpenAI, site: Site, base: str) -> None:
    kwargs: dict[str, Any] = {"model": base, "messages": USER, "max_tokens": 6, "logprobs": True, "top_logprobs": 3}
    out = client.chat.completions.create(**kwargs)
    assert out.choices[0].logprobs is not None and out.choices[0].logprobs.content is not None
    entries = out.choices[0].logprobs.content
    assert len(entries) == out.usage.completion_tokens  # type: ignore[union-attr]
    out_ids = ids_of(site, [bytes(e.bytes or []) for e in entries])
    ref = reference_logprobs(site, site.host.prompt_ids(USER), out_ids)
    for i, e in enumerate(entries):
        assert e.logprob == pytest.approx(float(ref[i, out_ids[i]]), abs=1e-3)
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].token == e.token  # greedy: the top token
        assert [t.logprob for t in e.top_logprobs] == pytest.approx(ref[i].topk(3).values.tolist(), abs=1e-3)
    streamed = [c for c in client.chat.completions.create(**kwargs, stream=True) if c.choices]
    tokens = [e.token for c in streamed if c.choices[0].logprobs for e in c.choices[0].logprobs.content or []]
    assert tokens == [e.token for e in entries]
    plain = client.chat.completions.create(model=base, messages=USER, max_tokens=2)  # type: ignore[arg-type]
    assert plain.choices[0].logprobs is None


def test_text_completion_logprobs(client: openai.OpenAI, base: str) -> None:
    out = client.completions.create(model=base, prompt="Triage:", max_tokens=4, logprobs=2)
    lp = out.choices[0].logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs and lp.text_offset is not None
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    assert all(len(top) <= 3 and tok in top for tok, top in zip(lp.tokens, lp.top_logprobs, strict=True))
    assert lp.text_offset[0] == 0 and all(v <= 0 for v in lp.token_logprobs)
    chunks = client.completions.create(model=base, prompt="Triage:", max_tokens=4, logprobs=2, stream=True)
    assert [
        t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens or []
    ] == lp.tokens


# ---- reasoning -------------------------------------------------------------------------------------


@contextlib.contextmanager
def forced_output(site: Site, pattern: str) -> Iterator[None]:
    """Make the random tiny model write `pattern` (a regular expression): it never writes a reasoning block
    of its own, so this test holds its output to one with the engine's own constrained decoding."""
    engine = site.serving.engine
    submit = engine.submit

    def forced(prompt: Any, params: Any = None, **kw: Any) -> str:
        return submit(prompt, replace(params, constraint=Constraint.regex(pattern)), **kw)

    engine.submit = forced  # type: ignore[method-assign]
    try:
        yield
    finally:
        engine.submit = submit  # type: ignore[method-assign]


@contextlib.contextmanager
def r1_template(site: Site) -> Iterator[None]:
    """An R1-Distill-style template: the generation prompt opens the reasoning block."""
    tok = site.host.tokenizer
    old = tok.chat_template
    tok.chat_template = old.replace(
        "{% if add_generation_prompt %}<｜Assistant｜>", "{% if add_generation_prompt %}<｜Assistant｜><think>\n"
    )
    try:
        yield
    finally:
        tok.chat_template = old


def test_reasoning_block_comes_back_as_reasoning_content(client: openai.OpenAI, site: Site, base: str) -> None:
    with forced_output(site, r"<think>[a-z]{2,6} [a-z]{2,6}</think>\n\n[a-z]{2,6}"):
        out = client.chat.completions.create(model=base, messages=USER, max_tokens=40)  # type: ignore[arg-type]
        chunks = list(client.chat.completions.create(model=base, messages=USER, max_tokens=40, stream=True))  # type: ignore[call-overload]
    message = out.choices[0].message
    reasoning = message.model_extra.get("reasoning_content") if message.model_extra else None
    assert reasoning and " " in reasoning and "<think>" not in reasoning, message
    assert message.content and message.content.isalpha(), message  # the answer, without the block
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    streamed_reasoning = "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas)
    assert streamed_reasoning == reasoning
    assert "".join(d.content or "" for d in deltas) == message.content


def test_a_block_the_prompt_opened_is_reasoning_to_its_end(client: openai.OpenAI, site: Site, base: str) -> None:
    with r1_template(site):
        open_only = client.chat.completions.create(model=base, messages=USER, max_tokens=5)  # type: ignore[arg-type]
        with forced_output(site, r"[a-z]{2,6}</think>[a-z]{2,6}"):
            closed = client.chat.completions.create(model=base, messages=USER, max_tokens=30)  # type: ignore[arg-type]
    extra = open_only.choices[0].message.model_extra or {}
    assert extra.get("reasoning_content") and open_only.choices[0].message.content is None  # never closed
    message = closed.choices[0].message
    assert (message.model_extra or {})["reasoning_content"].isalpha() and message.content and message.content.isalpha()


def test_structured_output_is_not_split(client: openai.OpenAI, site: Site, base: str) -> None:
    with r1_template(site):
        out = client.chat.completions.parse(model=base, messages=USER, response_format=Triage, max_completion_tokens=64)  # type: ignore[arg-type]
    assert isinstance(out.choices[0].message.parsed, Triage)


# ---- LangChain -------------------------------------------------------------------------------------


@pytest.fixture
def chat(site: Site, base: str) -> ChatOpenAI:
    return ChatOpenAI(model=base, base_url=f"{site.url}/v1", api_key=site.key, max_tokens=8, max_retries=0, timeout=120)  # type: ignore[arg-type]


def test_langchain_invoke_stream_batch(chat: ChatOpenAI) -> None:
    reply = chat.invoke("Chest pain since this morning.")
    assert reply.usage_metadata is not None and 0 < reply.usage_metadata["output_tokens"] <= 8  # max_tokens=8 held
    streamed = "".join(str(chunk.content) for chunk in chat.stream("Chest pain since this morning."))
    assert streamed == reply.content  # greedy: the same answer
    replies = chat.batch(["Fever.", "Chest pain since this morning.", "Cough."])
    assert len(replies) == 3 and replies[1].content == reply.content


def test_langchain_structured_output(site: Site, base: str) -> None:
    v1 = f"{site.url}/v1"
    model = ChatOpenAI(model=base, base_url=v1, api_key=site.key, max_tokens=64, max_retries=0, timeout=120)  # type: ignore[arg-type]
    structured = model.with_structured_output(Triage)  # OpenAI's json_schema response format, strict
    assert isinstance(structured.invoke("Chest pain since this morning. Triage it."), Triage)
    assert all(isinstance(r, Triage) for r in structured.batch(["Fever.", "Cough."]))
