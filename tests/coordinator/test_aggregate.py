"""The coordinator's update bound and its aggregators, as pure functions on numpy arrays.

Each aggregator is checked against values worked out by hand and against the property that makes
it robust: one update scaled x100 cannot pull a coordinate outside the honest updates' range.
"""

from __future__ import annotations

import numpy as np
import pytest

from coordinator.aggregate import (
    combine,
    coordinate_median,
    distance,
    outsized,
    round_start,
    trimmed_count,
    trimmed_mean,
    weighted_average,
)
from federation.protocol import wire
from federation.protocol.round_settings import AGGREGATIONS


def _update(*values: float) -> wire.Arrays:
    return {"layers.0.q_proj.lora_B": np.array(values, np.float32)}


def _honest(n: int, *, seed: int = 0) -> list[wire.Arrays]:
    rng = np.random.default_rng(seed)
    shapes = {"layers.0.q_proj.lora_A": (4, 16), "layers.0.q_proj.lora_B": (16, 4)}
    return [{k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()} for _ in range(n)]


def _scaled(arrays: wire.Arrays, factor: float) -> wire.Arrays:
    return {k: v * np.float32(factor) for k, v in arrays.items()}


def _within_honest_range(result: wire.Arrays, honest: list[wire.Arrays]) -> None:
    for name, value in result.items():
        stack = np.stack([u[name] for u in honest])
        assert np.all(value >= stack.min(axis=0) - 1e-6) and np.all(value <= stack.max(axis=0) + 1e-6), name


# ---- trimmed mean -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "trim", "dropped"),
    [(3, 0.2, 1), (5, 0.2, 1), (10, 0.2, 2), (11, 0.25, 3), (3, 0.0, 0), (1, 0.4, 0), (2, 0.4, 0), (4, 0.4, 1)],
)
def test_trimmed_count_rounds_up_and_always_leaves_the_middle(n: int, trim: float, dropped: int) -> None:
    assert trimmed_count(n, trim) == dropped
    assert n - 2 * dropped >= 1


@pytest.mark.parametrize("trim", [-0.1, 0.5, 0.9])
def test_trimmed_count_refuses_a_fraction_outside_0_to_half(trim: float) -> None:
    with pytest.raises(ValueError, match="trim fraction"):
        trimmed_count(5, trim)


def test_trimmed_mean_drops_each_coordinates_extremes() -> None:
    updates = [_update(1, -50), _update(2, 0), _update(3, 1), _update(4, 2), _update(100, 3)]
    out = trimmed_mean(updates, trim_fraction=0.2)  # one value off each end, per coordinate
    np.testing.assert_allclose(out["layers.0.q_proj.lora_B"], [3.0, 1.0])
    assert out["layers.0.q_proj.lora_B"].dtype == np.float32


def test_trimmed_mean_without_trimming_is_the_plain_mean() -> None:
    updates = _honest(4)
    out = trimmed_mean(updates, trim_fraction=0.0)
    for name in updates[0]:
        np.testing.assert_allclose(out[name], np.mean([u[name] for u in updates], axis=0), rtol=1e-6, atol=1e-6)


def test_trimmed_mean_does_not_modify_its_inputs() -> None:
    updates = _honest(5)
    before = [{k: v.copy() for k, v in u.items()} for u in updates]
    trimmed_mean(updates, trim_fraction=0.2)
    coordinate_median(updates)
    for u, b in zip(updates, before, strict=True):
        for name in u:
            np.testing.assert_array_equal(u[name], b[name])


# ---- coordinate-wise median ---------------------------------------------------------------------


def test_median_of_an_odd_and_an_even_count() -> None:
    np.testing.assert_allclose(
        coordinate_median([_update(1, 9), _update(7, 3), _update(2, 5)])["layers.0.q_proj.lora_B"], [2, 5]
    )
    np.testing.assert_allclose(coordinate_median([_update(1, 9), _update(3, 3)])["layers.0.q_proj.lora_B"], [2, 6])


def test_aggregators_refuse_updates_of_different_tensors_and_nothing() -> None:
    with pytest.raises(ValueError, match="different tensor names"):
        coordinate_median([_update(1.0), {"other": np.zeros(1, np.float32)}])
    with pytest.raises(ValueError, match="no updates"):
        trimmed_mean([], trim_fraction=0.2)


# ---- robustness to one update scaled x100 --------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "n_honest"), [("median", 2), ("median", 4), ("trimmed-mean", 2), ("trimmed-mean", 4)]
)
def test_a_robust_mean_keeps_every_coordinate_within_the_honest_updates(method: str, n_honest: int) -> None:
    honest = _honest(n_honest)
    poisoned = _scaled(_honest(1, seed=99)[0], 100.0)
    out = combine([(u, 1.0) for u in honest] + [(poisoned, 1.0)], method=method, trim_fraction=0.2)
    _within_honest_range(out, honest)


def test_fedavg_is_not_robust_to_a_scaled_update() -> None:
    """Why the robust options exist: the same poisoned update moves the weighted mean far outside."""
    honest = _honest(2)
    poisoned = _scaled(_honest(1, seed=99)[0], 100.0)
    out = combine([(u, 1.0) for u in honest] + [(poisoned, 1.0)], method="fedavg", trim_fraction=0.2)
    honest_mean = weighted_average([(u, 1.0) for u in honest])
    assert distance(out, honest_mean) > 10 * distance(honest[0], honest_mean)


def test_robust_means_ignore_the_example_count_a_site_reports() -> None:
    """A site that claims a billion examples outweighs everyone under fedavg, not under the robust means."""
    honest = _honest(2)
    liar = _scaled(_honest(1, seed=99)[0], 100.0)
    weighted = [(honest[0], 10.0), (honest[1], 10.0), (liar, 1e9)]
    for method in ("median", "trimmed-mean"):
        _within_honest_range(combine(weighted, method=method, trim_fraction=0.2), honest)
    fedavg = combine(weighted, method="fedavg", trim_fraction=0.2)
    np.testing.assert_allclose(fedavg["layers.0.q_proj.lora_B"], liar["layers.0.q_proj.lora_B"], rtol=1e-6)


def test_combine_knows_every_aggregation_and_refuses_others() -> None:
    updates = [(u, 2.0) for u in _honest(3)]
    for method in AGGREGATIONS:
        out = combine(updates, method=method, trim_fraction=0.2)
        assert {k: v.shape for k, v in out.items()} == {k: v.shape for k, v in updates[0][0].items()}
    with pytest.raises(ValueError, match="unknown aggregation 'mean'"):
        combine(updates, method="mean", trim_fraction=0.2)


# ---- the norm bound -----------------------------------------------------------------------------


def test_distance_is_the_l2_norm_of_the_difference_over_all_tensors() -> None:
    a = {"x": np.array([3.0, 0.0], np.float32), "y": np.array([[0.0]], np.float32)}
    b = {"x": np.array([0.0, 0.0], np.float32), "y": np.array([[4.0]], np.float32)}
    assert distance(a, b) == pytest.approx(5.0)
    assert distance(a, a) == 0.0


def test_round_start_is_the_global_adapter_or_an_estimate_of_the_shared_init() -> None:
    updates = [_update(1, 10), _update(2, 20), _update(300, 30)]
    start = _update(5, 5)
    assert round_start(updates, start) is start
    np.testing.assert_array_equal(round_start(updates, None)["layers.0.q_proj.lora_B"], [2, 20])  # the median
    # one or two updates: a median of two would be their mean, equally far from both; zero is LoRA B's init
    np.testing.assert_array_equal(round_start(updates[:2], None)["layers.0.q_proj.lora_B"], [0, 0])


def test_an_update_far_beyond_the_others_is_refused_with_a_reason() -> None:
    refused = outsized([0.58, 0.82, 61.4], ratio=10.0)
    assert set(refused) == {2}
    assert refused[2] == (
        "update norm 61.4 is 87.7x the median 0.7 of the other updates' (update-norm-ratio 10): refused as outsized"
    )


def test_honest_spread_passes_and_the_bound_can_be_turned_off() -> None:
    honest = [0.58, 0.82, 1.05]  # measured on the tiny model: sites of 48, 96 and 160 records
    assert outsized(honest, ratio=10.0) == {}
    assert outsized([*honest, 100.0], ratio=0) == {}
    assert outsized([*honest, 100.0], ratio=200.0) == {}


def test_with_two_sites_the_outsized_one_is_refused_not_the_honest_one() -> None:
    """Each update is compared with the median of the *others*: the x100 one cannot raise its own yardstick."""
    assert set(outsized([1.0, 100.0], ratio=10.0)) == {1}
    assert outsized([1.0], ratio=10.0) == {}  # nothing to compare with


def test_a_nonzero_update_among_zero_ones_is_refused() -> None:
    refused = outsized([0.0, 0.0, 0.5], ratio=10.0)
    assert set(refused) == {2} and "infinitely the median 0" in refused[2]


def test_the_bound_holds_against_a_minority_only() -> None:
    """Documented limit: when half the others are outsized too, the others' median is no longer honest."""
    assert set(outsized([1.0, 1.1, 0.9, 100.0, 100.0], ratio=10.0)) == {3, 4}
    assert outsized([1.0, 100.0, 100.0], ratio=10.0) == {}


def test_scaled_updates_stand_out_from_their_round_start() -> None:
    """The pipeline the strategy runs: start, distances, bound; x100 of a change or of the weights."""
    rng = np.random.default_rng(3)
    start = {k: v for k, v in _honest(1, seed=7)[0].items()}
    honest = [
        {k: v + 0.01 * rng.standard_normal(v.shape).astype(np.float32) for k, v in start.items()} for _ in range(3)
    ]
    scaled_change = {k: start[k] + 100 * (v - start[k]) for k, v in honest[0].items()}
    for poisoned in (scaled_change, _scaled(honest[0], 100.0)):
        updates = [poisoned, *honest[1:]]
        for known in (start, None):  # later rounds, and a first round (the median of the three)
            origin = round_start(updates, known)
            assert set(outsized([distance(u, origin) for u in updates], ratio=10.0)) == {0}


# ---- validation of every update (finite, shaped like the run's adapter) --------------------------


def test_validation_refuses_nan_inf_and_a_wrong_layout() -> None:
    like = _honest(1)[0]
    for bad in (np.nan, np.inf, -np.inf):
        arrays = {k: v.copy() for k, v in like.items()}
        arrays["layers.0.q_proj.lora_B"][3, 1] = bad
        with pytest.raises(wire.WireError, match="NaN or Inf"):
            wire.validate_arrays(arrays, like=like)
    with pytest.raises(wire.WireError, match="shape"):
        wire.validate_arrays({**like, "layers.0.q_proj.lora_B": np.zeros((16, 5), np.float32)}, like=like)
    with pytest.raises(wire.WireError, match="missing"):
        wire.validate_arrays({"layers.0.q_proj.lora_B": like["layers.0.q_proj.lora_B"]}, like=like)
