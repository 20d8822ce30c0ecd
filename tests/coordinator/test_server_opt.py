"""The coordinator's server step (FedOpt) on the combined update: what LoraFedAvg and SecAgg apply."""

from __future__ import annotations

import numpy as np
import pytest

from coordinator.server_opt import ServerOpt, ServerState
from federation.protocol.round_settings import RunSettings

A = "base_model.model.layers.0.self_attn.q_proj.lora_A.weight"
B = "base_model.model.layers.0.self_attn.q_proj.lora_B.weight"


def _arrays(a: float, b: float) -> dict[str, np.ndarray]:
    return {A: np.full((2, 4), a, np.float32), B: np.full((4, 2), b, np.float32)}


def test_plain_fedavg_is_the_combined_update_itself() -> None:
    state = ServerState(ServerOpt(), frozen_a=False)
    combined = _arrays(0.3, 0.7)
    assert state.step(_arrays(0.1, 0.2), combined) is combined


def test_fedavgm_carries_velocity_across_rounds() -> None:
    """v1 = d1, v2 = 0.9 v1 + d2: round 2 lands past the round's mean in the direction of both rounds."""
    state = ServerState(ServerOpt(kind="fedavgm", momentum=0.9), frozen_a=True)
    g1 = state.step(None, _arrays(0.5, 0.2))  # round 1 from the seeded init: B starts at zero
    assert np.allclose(g1[B], 0.2) and np.allclose(g1[A], 0.5)  # lr 1: the mean, velocity 0.2
    g2 = state.step(g1, _arrays(0.5, 0.3))  # d2 = 0.1 -> v2 = 0.18 + 0.1
    assert np.allclose(g2[B], 0.2 + 0.28) and np.allclose(g2[A], 0.5)  # FFA-LoRA: A never stepped


def test_a_trained_a_is_stepped_from_round_two_only() -> None:
    """Round 1 has no previous A at the coordinator (its init is the sites' own): it takes the mean."""
    state = ServerState(ServerOpt(kind="fedavgm", lr=2.0, momentum=0.5), frozen_a=False)
    g1 = state.step(None, _arrays(0.5, 0.2))
    assert np.allclose(g1[A], 0.5) and np.allclose(g1[B], 0.4)  # B: 0 + 2 * 0.2
    g2 = state.step(g1, _arrays(0.6, 0.4))
    assert np.allclose(g2[A], 0.5 + 2 * 0.1) and np.allclose(g2[B], 0.4 + 2 * (0.5 * 0.2 + 0.0))


def test_fedadam_steps_by_normalised_moments() -> None:
    state = ServerState(ServerOpt(kind="fedadam", lr=0.1, momentum=0.9), frozen_a=True)
    g1 = state.step(_arrays(0.0, 0.0), _arrays(0.0, 1.0))
    m1, m2 = 0.1 * 1.0, 0.01 * 1.0
    assert np.allclose(g1[B], 0.1 * m1 / (np.sqrt(m2) + 1e-3))


def test_settings_pick_the_step_and_bad_ones_are_refused() -> None:
    opt = ServerOpt.of(RunSettings(server_opt="fedavgm", server_lr=0.5, server_momentum=0.7))
    assert (opt.kind, opt.lr, opt.momentum) == ("fedavgm", 0.5, 0.7)
    with pytest.raises(ValueError, match="server optimizer"):
        ServerOpt(kind="sgd")
