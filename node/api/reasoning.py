"""An R1-style reasoning block, split off the answer: `<think>...</think>` becomes `reasoning_content`.

DeepSeek-R1 and its distills write their reasoning first, inside `<think>...</think>`, then the
answer. As DeepSeek's API and vLLM's `deepseek_r1` reasoning parser do, the chat routes return that
block as `message.reasoning_content` (stream: `delta.reasoning_content`) and the rest as `content`.
The block counts only at the start of the answer (after whitespace), or from the very start when
the prompt itself ends by opening it (R1-Distill chat templates end the generation prompt with
`<think>\\n`); a block that never closes is all reasoning. Text elsewhere that merely contains the
tags is content. A request held to a JSON schema or object is not split (its grammar starts at the
first token, so there is no block).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

OPEN, CLOSE = "<think>", "</think>"


def prompt_opens_block(tokenizer: Any, prompt_ids: Sequence[int]) -> bool:
    """Whether the prompt ends by opening a reasoning block (so the answer starts inside it)."""
    tail = str(tokenizer.decode(list(prompt_ids[-8:]), skip_special_tokens=False))
    return tail.rstrip().endswith(OPEN)


def _held(text: str, tag: str) -> int:
    """Characters at the end of `text` that could be the start of `tag` (held back until known)."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class ReasoningSplitter:
    """Streamed text in, (reasoning, content) increments out; `flush` at the end."""

    def __init__(self, *, opened: bool = False) -> None:
        self.state = "think" if opened else "start"
        self.buf = ""
        self.saw_block = opened

    def push(self, text: str) -> tuple[str, str]:
        self.buf += text
        reasoning, content = "", ""
        while True:
            if self.state == "start":
                stripped = self.buf.lstrip()
                if stripped.startswith(OPEN):
                    self.buf, self.state, self.saw_block = stripped[len(OPEN) :], "think", True
                    continue
                if OPEN.startswith(stripped):  # nothing but whitespace and a prefix of the tag yet
                    return reasoning, content
                self.state = "content"
            elif self.state == "think":
                at = self.buf.find(CLOSE)
                if at >= 0:
                    reasoning += self.buf[:at]
                    self.buf, self.state = self.buf[at + len(CLOSE) :], "after"
                    continue
                keep = _held(self.buf, CLOSE)
                reasoning += self.buf[: len(self.buf) - keep]
                self.buf = self.buf[len(self.buf) - keep :]
                return reasoning, content
            elif self.state == "after":  # the answer starts after the blank lines that follow the block
                stripped = self.buf.lstrip()
                if not stripped:
                    self.buf = ""
                    return reasoning, content
                self.buf, self.state = stripped, "content"
            else:
                content += self.buf
                self.buf = ""
                return reasoning, content

    def flush(self) -> tuple[str, str]:
        """What was held back, at the end of the output."""
        rest, self.buf = self.buf, ""
        if self.state == "think":
            return rest, ""
        if self.state == "after":
            return "", ""
        return "", rest


def split(text: str, *, opened: bool = False) -> tuple[str | None, str | None]:
    """(reasoning_content, content) of a whole answer: reasoning None when there was no block, content
    None when the answer is all reasoning (as vLLM's parser returns them)."""
    splitter = ReasoningSplitter(opened=opened)
    r1, c1 = splitter.push(text)
    r2, c2 = splitter.flush()
    if not splitter.saw_block:
        return None, text
    content = c1 + c2
    return r1 + r2, content or None
