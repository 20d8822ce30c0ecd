"""The empirical privacy check end to end: canaries through the real DP-LoRA round on the tiny model.

The non-private baseline must show memorisation (else the check could never fail); the DP run
at epsilon 1 must not prove a leak above its claim.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from node.canary_audit import audit_site, vocabulary_words
from node.engine import ModelHost
from node.model import load_model
from node.trainer import TrainSettings

# 16 inserted canaries per step (sample rate 1): 12 steps per run, about 15 s each on 2 cores.
SETTINGS = TrainSettings(local_epochs=12, batch_size=16, learning_rate=1e-2)


@pytest.fixture(scope="module")
def host(tiny_model_dir: Path) -> Iterator[ModelHost]:
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    model, tok = load_model(tiny_model_dir)
    with torch.no_grad():
        # The random tiny model's head (std 0.02, hidden 64) caps any logit near 1.3 nats, too
        # little to memorise anything; a pretrained head has no such cap.
        model.lm_head.weight.mul_(8.0)
    yield ModelHost(model, tok, model_name="tiny-audit")
    torch.set_num_threads(threads)


def test_vocabulary_words_are_single_tokens(host: ModelHost) -> None:
    words = vocabulary_words(host.tokenizer)
    assert len(words) > 1000
    for word in words[:: len(words) // 20]:
        assert len(host.tokenizer(" " + word, add_special_tokens=False)["input_ids"]) == 1


def test_dp_hides_what_the_non_private_baseline_memorises(host: ModelHost) -> None:
    baseline = audit_site(host, [], canaries=32, epsilon=None, settings=SETTINGS)
    private = audit_site(host, [], canaries=32, epsilon=1.0, settings=SETTINGS)
    print(f"\nno DP: {baseline.to_dict()}\nDP:    {private.to_dict()}")
    assert baseline.members == baseline.nonmembers == private.members == 16
    assert math.isinf(baseline.claimed_epsilon) and private.claimed_epsilon == 1.0
    assert baseline.auc >= 0.8, "without DP the canaries must be detectable, or the check is blind"
    assert private.epsilon_lower_bound <= private.claimed_epsilon
    assert private.auc < baseline.auc
