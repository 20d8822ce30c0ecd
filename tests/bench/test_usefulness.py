"""The usefulness benchmark compares arms fairly: one held-out set, the coordinator's own average."""

from __future__ import annotations

import numpy as np

from bench.usefulness import federated_average, held_out, site_splits
from federation import wire
from node.trainer import RoundResult


def _result(site: str, value: float, n: int) -> RoundResult:
    arrays = {"lora_A": np.full((2, 3), value, np.float32), "lora_B": np.full((3, 2), -value, np.float32)}
    report = wire.PrivacyReport(
        site=site,
        epsilon=0.5,
        delta=1e-5,
        steps=1,
        sample_rate=0.1,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        accountant="rdp",
        num_examples=n,
        train_loss=1.0,
    )
    return RoundResult(arrays=arrays, report=report)


def test_federated_average_weights_each_site_by_its_examples() -> None:
    """Not an unweighted mean: a site with 3x the records pulls the global adapter 3x as hard."""
    out = federated_average([_result("a", 1.0, 100), _result("b", 5.0, 300)])
    np.testing.assert_allclose(out["lora_A"], np.full((2, 3), 4.0))
    np.testing.assert_allclose(out["lora_B"], np.full((3, 2), -4.0))


def test_every_arm_is_scored_on_the_same_disjoint_held_out_records() -> None:
    """Test records come from every site, never overlap training or validation, and are reproducible."""
    splits = site_splits(n_sites=3, n_train=30, n_val=5, n_test=7, seed=11)
    again = site_splits(n_sites=3, n_train=30, n_val=5, n_test=7, seed=11)
    test = held_out(splits, "test")
    assert test == held_out(again, "test")
    assert len(test) == 21
    assert [len(s.test) for s in splits] == [7, 7, 7]
    for s in splits:
        seen = {r.note for r in s.train} | {r.note for r in s.val}
        assert not seen & {r.note for r in s.test}
    band = 9000 // 3  # demo_data gives each of the 3 sites its own postcode band
    assert {(int(r.postcode) - 1000) // band for r in test} == {0, 1, 2}
