"""What the node reads of vLLM's answers while passing them on: the output (for its keyed digest in the
audit record), the finish reason, vLLM's token usage and any error.

A streamed answer is relayed event by event as it arrives (server-sent events end with a blank line);
nothing waits for the whole body. Two edits only: the node always asks vLLM for the final usage chunk
(the audit record and the metrics need the token counts) and drops it when the client did not ask for
it, so the client gets what it asked for; and where vLLM names the base model otherwise than the node
does, the `model` field is given the node's name. Every other byte goes through unchanged, but one is
late: vLLM's closing `data: [DONE]` is held back until the node has written the request's audit record,
so a client that has read the end of the stream finds its record (CI once read the trail in between).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

__all__ = ["DONE", "MAX_EVENT_BYTES", "Outcome", "SseRelay", "read_whole"]

DONE = b"data: [DONE]\n\n"
"""The stream's last event, sent by the caller once the record is written (`SseRelay.done`)."""

MAX_EVENT_BYTES = 1 << 20
"""An event longer than this without its blank line is passed on as it is (not held, not read)."""


@dataclass
class Outcome:
    """What one forwarded request produced, as far as the node saw it."""

    texts: dict[int, list[str]] = field(default_factory=dict)  # choice index -> pieces
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    error: str | None = None
    upstream_id: str | None = None
    first_chunk_at: float | None = None
    pieces_seen: int = 0
    """Text pieces read: a stream cut short has no usage chunk, and vLLM streams a piece per token."""

    def output(self) -> str:
        """The generated text; choices (`n` > 1) in index order, separated by U+001E."""
        return "\x1e".join("".join(self.texts[i]) for i in sorted(self.texts))

    def take(self, obj: Any) -> None:
        """Read one answer or stream chunk (OpenAI's chat or text completion shape)."""
        if not isinstance(obj, dict):
            return
        if isinstance(obj.get("error"), dict):
            self.error = str(obj["error"].get("message", "error")).splitlines()[0] if obj["error"] else "error"
            return
        self.upstream_id = self.upstream_id or (obj.get("id") if isinstance(obj.get("id"), str) else None)
        for choice in obj.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            index = choice.get("index", 0) if isinstance(choice.get("index", 0), int) else 0
            part = choice.get("delta") or choice.get("message")
            pieces = self.texts.setdefault(index, [])
            before = len(pieces)
            if isinstance(part, dict):
                for key in ("reasoning_content", "reasoning", "content"):
                    if isinstance(part.get(key), str) and part[key]:
                        pieces.append(part[key])
            elif isinstance(choice.get("text"), str) and choice["text"]:
                pieces.append(choice["text"])
            self.pieces_seen += len(pieces) > before
            if choice.get("finish_reason") and index == min(self.texts):
                self.finish_reason = str(choice["finish_reason"])
        usage = obj.get("usage")
        if isinstance(usage, dict):
            if isinstance(usage.get("prompt_tokens"), int):
                self.prompt_tokens = usage["prompt_tokens"]
            if isinstance(usage.get("completion_tokens"), int):
                self.completion_tokens = usage["completion_tokens"]


def read_whole(raw: bytes, outcome: Outcome, *, rename: str | None) -> bytes:
    """A whole (non-streamed) JSON answer: read into `outcome`; its bytes, with `model` renamed if asked."""
    try:
        obj = json.loads(raw)
    except ValueError:
        outcome.error = "the serving backend's answer is not JSON"
        return raw
    outcome.take(obj)
    if rename is not None and isinstance(obj, dict) and "model" in obj:
        obj["model"] = rename
        return json.dumps(obj).encode()
    return raw


class SseRelay:
    """Server-sent events from vLLM to the client, one event at a time (see the module's docstring)."""

    def __init__(self, *, strip_usage: bool, rename: str | None) -> None:
        self.outcome = Outcome()
        self.strip_usage = strip_usage
        self.rename = rename
        self.done = False  # `data: [DONE]` seen (and held back): the stream ended as it should
        self._buffer = b""

    def feed(self, chunk: bytes) -> bytes:
        """The bytes to send on after `chunk` arrived (whole events only; possibly none yet)."""
        if self.outcome.first_chunk_at is None:
            self.outcome.first_chunk_at = time.perf_counter()
        self._buffer += chunk
        out: list[bytes] = []
        while (end := self._buffer.find(b"\n\n")) >= 0:
            event, self._buffer = self._buffer[: end + 2], self._buffer[end + 2 :]
            out.append(self._event(event))
        if len(self._buffer) > MAX_EVENT_BYTES:  # not SSE as vLLM writes it: pass it on, unread
            out.append(self._buffer)
            self._buffer = b""
        return b"".join(out)

    def flush(self) -> bytes:
        """What is left when vLLM's body ends (an event without its blank line)."""
        rest, self._buffer = self._buffer, b""
        return self._event(rest) if rest.strip() else rest

    def _event(self, event: bytes) -> bytes:
        lines = event.strip().split(b"\n")
        if len(lines) != 1 or not lines[0].startswith(b"data:"):
            return event  # a comment, a multi-line event: not vLLM's chunks, passed on as they are
        payload = lines[0][5:].strip()
        if payload == b"[DONE]":
            self.done = True
            return b""  # the caller sends DONE after the audit record
        try:
            obj = json.loads(payload)
        except ValueError:
            return event
        self.outcome.take(obj)
        if not isinstance(obj, dict):
            return event
        if self.strip_usage and obj.get("choices") == [] and isinstance(obj.get("usage"), dict):
            return b""  # the usage chunk the node asked for, not the client
        if self.rename is not None and "model" in obj:
            obj["model"] = self.rename
            return b"data: " + json.dumps(obj).encode() + b"\n\n"
        return event
