"""The reasoning block split (node/api/reasoning.py): whole answers, and streams cut at every character."""

from __future__ import annotations

import pytest

from node.api.reasoning import ReasoningSplitter, prompt_opens_block, split

CASES = [
    # (answer, the prompt opened the block, reasoning, content)
    ("<think>check vitals</think>\n\nAdmit.", False, "check vitals", "Admit."),
    ("  <think>a</think>b", False, "a", "b"),
    ("<think>never closed", False, "never closed", None),
    ("Admit. <think>not at the start</think>", False, None, "Admit. <think>not at the start</think>"),
    (" Admit.", False, None, " Admit."),
    ("<thin", False, None, "<thin"),  # a prefix of the tag, then the end: content
    ("weigh it</think>\n\nAdmit.", True, "weigh it", "Admit."),
    ("weigh it", True, "weigh it", None),
    ("a</thi", True, "a</thi", None),  # a partial closing tag at the end is reasoning
    ("", False, None, ""),
]


@pytest.mark.parametrize(("text", "opened", "reasoning", "content"), CASES)
def test_whole_and_streamed_answers_split_alike(text: str, opened: bool, reasoning: str | None, content: str) -> None:
    assert split(text, opened=opened) == (reasoning, content)
    for cut in range(1, 4):  # streamed in pieces of 1, 2 and 3 characters
        splitter = ReasoningSplitter(opened=opened)
        got_r, got_c = "", ""
        for i in range(0, len(text), cut):
            r, c = splitter.push(text[i : i + cut])
            got_r, got_c = got_r + r, got_c + c
        r, c = splitter.flush()
        got_r, got_c = got_r + r, got_c + c
        assert got_r == (reasoning or "") and got_c == (content or "")


def test_the_prompt_opens_a_block_when_it_ends_with_the_tag() -> None:
    class Tok:
        def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
            return "".join(chr(i) for i in ids)

    assert prompt_opens_block(Tok(), [ord(c) for c in "Assistant:<think>\n"])
    assert not prompt_opens_block(Tok(), [ord(c) for c in "Assistant:"])
