"""Constrained decoding: a request's output held to a JSON schema (or any JSON object) token by token.

The grammar library is outlines-core (Rust; what vLLM's `outlines` backend uses): a JSON schema
becomes a regular expression, the regular expression and the tokenizer's vocabulary an `Index`
(for every automaton state, which token ids may come next), and each request walks it with a
`Guide`. Before each step the scheduler writes every constrained row's allowed tokens as a bitmask
(`Guided.fill`, about 1 us a row) and the runner samples those rows among them only
(`sampling.apply_bitmask`); after the step it advances the guide by the sampled token. xgrammar was
not taken: its wheel requires triton, which the CPU install must not pull.

Compiling an index walks the whole vocabulary once per automaton state: measured on this 2-core
machine with the DeepSeek V3 tokenizer (129,280 tokens), a three-field pydantic schema 0.7-1.3 s,
a string of `maxLength` 12 1.2 s but of `maxLength` 30 more than 6 minutes, `json_object` (below)
4.6 s, and the generic "any JSON value" of an unconstrained `{}` or `{"type": "object"}` 25-60 s.
Hence: indexes are cached per constraint; a schema whose expression is longer than `MAX_REGEX` (the
generic ones) is refused at once with a 400 asking for `properties`/`items`; the others compile
one at a time in a child process (grammar_worker.py) that is killed when a compile overruns
`compile_timeout_s` (a 400 for that request), so no schema can hold a core or the queue for long.
Some keywords are not part of outlines' expression (`UNENFORCED`: numeric bounds, `uniqueItems`, the
conditional ones): a schema using them is held to the rest. OpenAI's `strict: true` promises every
keyword holds, so such a request is refused by name (node/api/protocol.py); without `strict` the
schema is best effort, as OpenAI's own non-strict mode.
"""

from __future__ import annotations

import collections
import json
import pickle
import select
import subprocess
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from federation.errors import Busy, InvalidInput

__all__ = [
    "JSON_OBJECT",
    "MAX_REGEX",
    "UNENFORCED",
    "Constraint",
    "GrammarBusy",
    "GrammarError",
    "Grammars",
    "Guided",
    "TokenTable",
    "unenforced_keywords",
]

MAX_REGEX = 4096
"""Longest regular expression compiled (characters). A schema with `properties` and `items` stays far
below (a five-field object of strings: about 300); the generic `{}` is 13,879 and `{"type": "array"}`
6,832, whose indexes took 25-60 s."""

UNENFORCED = frozenset(
    {
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
        "multipleOf",
        "uniqueItems",
        "contains",
        "minContains",
        "maxContains",
        "minProperties",
        "maxProperties",
        "not",
        "if",
        "then",
        "else",
        "propertyNames",
        "patternProperties",
        "dependentRequired",
        "dependentSchemas",
    }
)
"""JSON-schema keywords outlines-core 0.2.14 leaves out of the expression: with and without each, it builds
the same regular expression (tests/node/serving/test_grammar.py checks every one, so a release that starts
enforcing one fails there). `additionalProperties: false` is not here: only the listed properties are
generated anyway."""

_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems")
_SCHEMA_ONE = ("items", "additionalProperties", "not", "if", "then", "else", "contains", "propertyNames")


def unenforced_keywords(schema: object, where: str = "") -> list[tuple[str, str]]:
    """`(path, keyword)` for each keyword of `UNENFORCED` in `schema`, walking its subschemas only (a
    property named `minimum` is a name, not a keyword; `enum` and `const` values are data)."""
    if not isinstance(schema, dict):
        return []
    found = [(where, key) for key in schema if key in UNENFORCED]
    for key in _SCHEMA_MAPS:
        if isinstance(schema.get(key), dict):
            for name, sub in schema[key].items():
                found += unenforced_keywords(sub, f"{where}.{key}.{name}")
    for key in _SCHEMA_LISTS:
        if isinstance(schema.get(key), list):
            for i, sub in enumerate(schema[key]):
                found += unenforced_keywords(sub, f"{where}.{key}[{i}]")
    for key in _SCHEMA_ONE:
        found += unenforced_keywords(schema.get(key), f"{where}.{key}")
    return found


_WS = r"[ ]?"  # outlines' default whitespace between JSON tokens: one optional space, so output stays short


def _json_object_regex() -> str:
    """A JSON object whose values are scalars, or arrays/objects of scalars (two levels).

    outlines' own regex for `{"type": "object"}` nests any value three levels deep and took 25 s to
    index against a 129k vocabulary; this one 4.6 s (measured, DeepSeek V3 tokenizer)."""
    from outlines_core.json_schema import BOOLEAN, NULL, NUMBER, STRING

    scalar = f"({STRING}|{NUMBER}|{BOOLEAN}|{NULL})"

    def items(v: str) -> str:
        return f"({v}({_WS},{_WS}{v})*)?"

    def obj(v: str) -> str:
        return rf"\{{{_WS}{items(f'{STRING}{_WS}:{_WS}{v}')}{_WS}\}}"

    def arr(v: str) -> str:
        return rf"\[{_WS}{items(v)}{_WS}\]"

    return obj(f"({scalar}|{arr(scalar)}|{obj(scalar)})")


JSON_OBJECT = "json_object"


class GrammarError(InvalidInput, ValueError):
    """A `response_format` the engine cannot hold the output to (an invalid or too permissive schema)."""

    default_code = "invalid_response_format"


class GrammarBusy(Busy):
    """Too many schemas are compiling at once (429)."""

    default_code = "grammar_queue_full"


@dataclass(frozen=True)
class Constraint:
    """What a request's output must match: `json_schema` (spec: the schema as canonical JSON),
    `json_object` (any JSON object, see `_json_object_regex`) or `regex` (spec: the expression)."""

    kind: Literal["json_schema", "json_object", "regex"]
    spec: str = ""

    @classmethod
    def json_schema(cls, schema: dict[str, Any]) -> Constraint:
        return cls("json_schema", json.dumps(schema, sort_keys=True, separators=(",", ":")))

    @classmethod
    def json_object(cls) -> Constraint:
        return cls("json_object")

    @classmethod
    def regex(cls, pattern: str) -> Constraint:
        return cls("regex", pattern)

    def to_regex(self) -> str:
        """The regular expression the output must match; raises GrammarError."""
        if self.kind == "json_object":
            return _json_object_regex()
        if self.kind == "regex":
            return self.spec
        from outlines_core.json_schema import build_regex_from_schema

        try:
            regex = str(build_regex_from_schema(self.spec))
        except BaseException as exc:  # outlines raises ValueError, and pyo3 panics for some inputs
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                raise
            raise GrammarError(
                f"response_format: the JSON schema is not supported: {str(exc).splitlines()[0]}"
            ) from exc
        if len(regex) > MAX_REGEX:
            raise GrammarError(
                "response_format: the JSON schema allows any JSON value somewhere (an object without "
                "`properties`, an array without `items`, or an empty schema); constrained decoding needs "
                "them spelled out (or use {'type': 'json_object'})"
            )
        return regex


# ---- the vocabulary as bytes --------------------------------------------------------------------------


def _gpt2_byte_decoder() -> dict[str, int]:
    """Byte-level BPE's printable stand-in for each byte (GPT-2's table), inverted."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), ord("\xff") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def _decoder_kind(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = str(getattr(backend, "decoder", "")) if backend is not None else ""
    if "ByteLevel" in decoder:
        return "byte_level"
    if "ByteFallback" in decoder or "Metaspace" in decoder:
        return "sentencepiece"
    return "decode"


class TokenTable:
    """Each token id's bytes (None: a special token, never part of constrained text), and its text.

    Byte-level BPE (GPT-2, Qwen2, Llama 3, DeepSeek) maps its printable stand-ins back to bytes;
    SentencePiece maps `▁` to a space and `<0xAB>` to its byte; any other tokenizer decodes each id
    alone. Building it walks the vocabulary once (about 1 s for 129k tokens here): do it off the
    event loop (`Grammars.table` is built in the compile thread or by `load`)."""

    def __init__(self, tokenizer: Any, size: int) -> None:
        self.tokenizer = tokenizer
        self.size = size
        special = {int(i) for i in (getattr(tokenizer, "all_special_ids", None) or [])}
        self.bytes: list[bytes | None] = [None] * size
        kind = _decoder_kind(tokenizer)
        if kind == "decode" or not hasattr(tokenizer, "get_vocab"):
            for i in range(size):
                if i not in special:
                    text = str(tokenizer.decode([i], skip_special_tokens=True))
                    self.bytes[i] = text.encode() if text else None
            return
        added = {int(i): t for i, t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items()}
        byte_of = _gpt2_byte_decoder()
        for token, i in tokenizer.get_vocab().items():
            if not 0 <= i < size or i in special:
                continue
            if i in added:
                self.bytes[i] = str(getattr(added[i], "content", token)).encode()
            elif kind == "byte_level":
                try:
                    self.bytes[i] = bytes(byte_of[c] for c in token)
                except KeyError:
                    self.bytes[i] = None
            elif len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
                self.bytes[i] = bytes([int(token[3:5], 16)])
            else:
                self.bytes[i] = token.replace("\u2581", " ").encode()

    def text(self, token: int) -> tuple[str, bytes]:
        """The token as OpenAI's logprobs show it: its text (U+FFFD for a partial character) and bytes."""
        raw = self.bytes[token] if 0 <= token < self.size else None
        if raw is None:
            raw = str(self.tokenizer.decode([token], skip_special_tokens=False)).encode()
        return raw.decode("utf-8", errors="replace"), raw


# ---- compiled grammars and per-request guides --------------------------------------------------------


class Guided:
    """One request's walk through its constraint's index."""

    def __init__(self, guide: Any, constraint: Constraint) -> None:
        self.guide = guide
        self.constraint = constraint

    def fill(self, row: torch.Tensor) -> None:
        """Write the allowed next tokens into `row` (a contiguous CPU int32 bitmask, bit i = token i)."""
        self.guide.write_mask_into(row.data_ptr(), row.numel(), 4)

    def advance(self, token: int) -> bool:
        """Take `token`; False if the constraint does not allow it (the runner ignored the mask)."""
        try:
            self.guide.advance(token, return_tokens=False)
        except ValueError:
            return False
        return True


class Grammars:
    """The engine's compiled constraints over one tokenizer: an LRU of indexes, one compile thread.

    `submit` starts a compile (or returns the cached / in-flight one) without blocking, so the HTTP
    layer awaits it off the event loop; `guide` blocks until the index exists (a cache hit when the
    HTTP layer awaited it first). At most `max_pending` distinct compiles wait; more is GrammarBusy."""

    def __init__(
        self, tokenizer: Any, *, vocab_size: int, eos_token_id: int, cache_size: int = 64, max_pending: int = 4
    ) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.words = (vocab_size + 31) // 32  # int32 words of one row's bitmask
        self.eos_token_id = eos_token_id
        self.cache_size = cache_size
        self.max_pending = max_pending
        self._lock = threading.Lock()
        self._table: TokenTable | None = None
        self._vocabulary: Any = None
        self._done: collections.OrderedDict[Constraint, Future[Any]] = collections.OrderedDict()
        self._pending: dict[Constraint, Future[Any]] = {}
        self._queue: collections.deque[Constraint] = collections.deque()
        self._worker: threading.Thread | None = None
        self._compiler = _Compiler()
        self.compile_timeout_s = 30.0
        """How long one schema may compile before its process is killed and the request refused."""

    # ---- the vocabulary ----------------------------------------------------------------------
    def table(self) -> TokenTable:
        """Token id -> bytes/text (built on first use; about 1 s for 129k tokens)."""
        with self._lock:
            if self._table is None:
                size = min(self.vocab_size, len(self.tokenizer)) if hasattr(self.tokenizer, "__len__") else 0
                self._table = TokenTable(self.tokenizer, size or self.vocab_size)
            return self._table

    def _outlines_vocabulary(self) -> Any:
        from outlines_core import Vocabulary

        if self._vocabulary is None:
            by_bytes: dict[bytes, list[int]] = {}
            for i, raw in enumerate(self.table().bytes):
                if raw and i != self.eos_token_id:
                    by_bytes.setdefault(raw, []).append(i)
            self._vocabulary = Vocabulary(self.eos_token_id, by_bytes)
        return self._vocabulary

    # ---- compiling ---------------------------------------------------------------------------
    def submit(self, constraint: Constraint) -> Future[Any]:
        """The constraint's index as a future (done when cached); raises GrammarError, GrammarBusy."""
        constraint.to_regex()  # refuse an unsupported or generic schema now, before queueing
        with self._lock:
            if (fut := self._done.get(constraint)) is not None:
                self._done.move_to_end(constraint)
                return fut
            if (fut := self._pending.get(constraint)) is not None:
                return fut
            if len(self._pending) >= self.max_pending:
                raise GrammarBusy(f"{len(self._pending)} response formats are compiling; retry later")
            fut = Future()
            self._pending[constraint] = fut
            self._queue.append(constraint)
            if self._worker is None or not self._worker.is_alive():
                # a daemon thread, not an executor: a compile in progress never holds up the process's exit
                self._worker = threading.Thread(target=self._compile_loop, name="fedseek-grammar", daemon=True)
                self._worker.start()
            return fut

    def _compile_loop(self) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    self._worker = None
                    return
                constraint = self._queue.popleft()
                fut = self._pending[constraint]
            try:
                index = self._compiler.compile(constraint.to_regex(), self._outlines_vocabulary, self.compile_timeout_s)
            except GrammarError as exc:
                with self._lock:
                    self._pending.pop(constraint, None)
                fut.set_exception(exc)
                continue
            with self._lock:
                self._pending.pop(constraint, None)
                self._done[constraint] = fut
                while len(self._done) > self.cache_size:
                    self._done.popitem(last=False)
            fut.set_result(index)

    def close(self) -> None:
        """Stop the compile process (the engine's `stop`)."""
        self._compiler.stop()

    def guide(self, constraint: Constraint) -> Guided:
        """A fresh walk of the constraint (compiling it first if nobody did: blocks up to
        `compile_timeout_s` and a queue's worth); raises GrammarError, GrammarBusy."""
        from outlines_core import Guide

        return Guided(Guide(self.submit(constraint).result()), constraint)

    def bitmask(self, guides: Sequence[Guided]) -> torch.Tensor:
        """[len(guides), words] int32 on the CPU: each guide's allowed next tokens."""
        out = torch.zeros(len(guides), self.words, dtype=torch.int32)
        for row, g in zip(out, guides, strict=True):
            g.fill(row)
        return out


class _Compiler:
    """The compile child process (grammar_worker.py), started on first use and after each kill."""

    SCRIPT = Path(__file__).with_name("grammar_worker.py")

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None

    def _start(self, vocabulary: Any) -> subprocess.Popen[bytes]:
        if self._proc is None or self._proc.poll() is not None:
            from node.serving import grammar_worker

            self._proc = subprocess.Popen(
                [sys.executable, "-I", str(self.SCRIPT)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
            )
            assert self._proc.stdin is not None
            grammar_worker.write(self._proc.stdin, vocabulary())
        return self._proc

    def compile(self, regex: str, vocabulary: Any, timeout: float) -> Any:
        """The outlines Index of `regex` (`vocabulary()` gives the Vocabulary); raises GrammarError."""
        from node.serving import grammar_worker

        try:
            proc = self._start(vocabulary)
            assert proc.stdin is not None and proc.stdout is not None
            grammar_worker.write(proc.stdin, regex)
            ready, _, _ = select.select([proc.stdout], [], [], timeout)
            reply = grammar_worker.read(proc.stdout) if ready else None
        except (OSError, EOFError, pickle.UnpicklingError) as exc:
            self.stop()
            raise GrammarError(f"response_format: the grammar compiler failed ({exc})") from exc
        if reply is None:
            self.stop()
            raise GrammarError(
                f"response_format: the schema did not compile within {timeout:g} s (bounded strings and "
                "arrays cost most: a `maxLength` of tens of characters can take minutes); simplify it"
            )
        status, value = reply
        if status != "ok":
            raise GrammarError(f"response_format: {value}")
        return value

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            for stream in (self._proc.stdin, self._proc.stdout):
                if stream is not None:
                    stream.close()
            self._proc = None
