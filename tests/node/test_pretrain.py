"""node/pretrain.py: the restricted-vocabulary head, on the real tiny DeepSeek-V3."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from node.data import Example, TokenizedExample, collate, tokenize
from node.model import load_model, write_tiny_model
from node.pretrain import PretrainSettings, _RestrictedHead, pretrain

CHATS = [
    [
        {"role": "user", "content": f"Note {i}: chest pain and troponin elevated.\nWhich department?"},
        {"role": "assistant", "content": answer},
    ]
    for i, answer in enumerate(["cardiology", "neurology", "gastroenterology", "respiratory"] * 2)
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def _all_rows(tok: Any) -> list[TokenizedExample]:
    rows = []
    for chat in CHATS:
        ids = tok.apply_chat_template(chat, tokenize=True)
        ids = [int(i) for i in (ids["input_ids"] if hasattr(ids, "keys") else ids)]
        rows.append(TokenizedExample(input_ids=ids, labels=list(ids)))
    return rows


def test_restricted_head_loss_is_the_full_vocabulary_loss(tiny: Path) -> None:
    """With every other head row zeroed, the loss over the corpus's ids plus one column for the rest is exact."""
    model, tok = load_model(tiny)
    rows = _all_rows(tok)
    vocab = sorted({t for r in rows for t in r.labels})
    head = _RestrictedHead.of(model, vocab, device="cpu")
    weight = model.get_output_embeddings().weight
    outside = torch.ones(weight.size(0), dtype=torch.bool)
    outside[vocab] = False
    assert bool((weight[outside] == 0).all()) and bool((weight[~outside] != 0).any())
    batch = collate(rows, pad_id=int(tok.pad_token_id))
    with torch.no_grad():
        restricted = head.loss(model, batch, per_sample=False)
        full = model(**batch).loss  # the whole 129k-token head
    assert float(restricted) == pytest.approx(float(full), rel=1e-4)
    assert float(full) > math.log(weight.size(0)) - 2  # a seeded model: about ln(vocabulary)


def test_restricted_pretraining_learns_and_leaves_other_tokens_at_zero(tiny: Path) -> None:
    model, tok = load_model(tiny)
    rows = tokenize([Example(messages=c) for c in CHATS], tok)
    vocab = tuple(sorted({t for r in rows for t in r.labels if t != -100}))
    settings = PretrainSettings(epochs=8, batch_size=8, learning_rate=5e-2, loss="answer", vocabulary=vocab)
    before_input = model.get_input_embeddings().weight.detach().clone()
    result = pretrain(model, rows, pad_id=int(tok.pad_token_id), settings=settings, log=lambda _: None)
    weight = model.get_output_embeddings().weight
    outside = torch.ones(weight.size(0), dtype=torch.bool)
    outside[list(vocab)] = False
    assert bool((weight[outside] == 0).all())  # no gradient ever reached them: their logit stays 0
    assert result.final_loss < 6.0, result  # from about ln(129k) = 11.8: the answers are being learned
    assert not torch.equal(before_input, model.get_input_embeddings().weight)  # all weights train (not frozen here)


def test_restricted_head_refuses_a_tied_head_and_ids_out_of_range(tiny: Path) -> None:
    model, _ = load_model(tiny)
    with pytest.raises(ValueError, match="lie in"):
        _RestrictedHead.of(model, [model.get_output_embeddings().weight.size(0)], device="cpu")
    model.get_output_embeddings().weight = model.get_input_embeddings().weight
    with pytest.raises(ValueError, match="untied"):
        _RestrictedHead.of(model, [1, 2], device="cpu")
