"""Tiny seeded Qwen2 models (the fast path's architecture) and a toy tokenizer for the engine tests."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
import torch

from tests.tiny_qwen import tiny_qwen2

torch.set_num_threads(2)

EOS = 1


class ToyTokenizer:
    """Token i renders as one letter; EOS renders as nothing (a special token)."""

    eos_token_id = EOS

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(97 + i % 26) for i in ids if not (skip_special_tokens and i == EOS))


PIECES = ['{"', '"}', '":', '", "', '": "', '":"', '",', ' "', "true", "false", "null", "routine", "urgent"]
PIECES += ["emergency", "admit", "note", "ro", "ur", "gent", "em", "er", "ad", "mit", "no", "te", "ine", "cy", "}"]


class CharTokenizer:
    """A tokenizer a JSON grammar can work with: 0 pad and 1 EOS (special), then every printable ASCII
    character, JSON-ish pieces, and two-letter pieces up to the vocabulary's size."""

    eos_token_id = EOS
    pad_token_id = 0
    all_special_ids: ClassVar[list[int]] = [0, EOS]

    def __init__(self, vocab: int = 512) -> None:
        letters = [a + b for a in "abcdefghijklmnopqrstuvwxyz" for b in "aeiou"]
        self.pieces = ["", ""] + [chr(c) for c in range(32, 127)] + PIECES + letters
        self.pieces = (self.pieces + ["zz"] * vocab)[:vocab]

    def __len__(self) -> int:
        return len(self.pieces)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(self.pieces[i] if i not in self.all_special_ids else "" for i in ids)

    def encode(self, text: str) -> list[int]:
        return [self.pieces.index(c) for c in text]


def tiny_qwen(seed: int = 0, vocab: int = 512) -> Any:
    return tiny_qwen2(seed=seed, vocab_size=vocab, max_position_embeddings=256, eos_token_id=EOS)


def hf_greedy(model: Any, prompt: list[int], n: int) -> list[int]:
    """HF greedy decoding of `prompt` on the model's own device: the reference tokens."""
    ids = torch.tensor([prompt], device=next(model.parameters()).device)
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return [int(t) for t in out[0, len(prompt) :]]


@pytest.fixture
def qwen() -> Any:
    return tiny_qwen()


@pytest.fixture
def tok() -> ToyTokenizer:
    return ToyTokenizer()


def run_together(
    engine: Any, requests: list[tuple[list[int], Any, str | None]], timeout: float = 60
) -> list[list[Any]]:
    """Submit every request before the engine starts (so they share batches), run, return each one's events."""
    import threading

    events: list[list[Any]] = [[] for _ in requests]
    done = threading.Semaphore(0)

    def collect(i: int) -> Any:
        def on_event(ev: Any) -> None:
            events[i].append(ev)
            if ev.finish_reason is not None:
                done.release()

        return on_event

    for i, (prompt, params, adapter) in enumerate(requests):
        engine.submit(prompt, params, adapter=adapter, on_event=collect(i))
    engine.start()
    for _ in requests:
        assert done.acquire(timeout=timeout)
    return events


def token_ids(events: list[Any]) -> list[int]:
    return [t for ev in events for t in ev.token_ids]
