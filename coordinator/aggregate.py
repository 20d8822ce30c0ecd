"""How a round's LoRA updates are bounded and combined, free of Flower so benchmarks and tools can import it.

`coordinator.strategy.LoraFedAvg` validates and aggregates with these functions (and re-exports
`weighted_average`); keeping them here lets `bench/usefulness.py` compute exactly the coordinator's
average on a machine without `flwr` installed. Every function is pure: numpy arrays in, new arrays out.

Combining (`combine`, RunSettings.aggregation):
- `fedavg`: the mean weighted by each site's example count (`weighted_average`), exact, not robust;
- `trimmed-mean`: per coordinate, drop the largest and smallest values and average the rest;
- `median`: the coordinate-wise median.
The robust two are unweighted: a site reports its own example count, and a weight it may inflate
would let one site outvote the others again.

Bounding (`outsized`, RunSettings.update_norm_ratio): an update's size is its L2 distance from the
adapter the round started from (`round_start`); it is refused when that is more than `ratio` times the
median of the other updates' sizes. Why relative, and why 10 by default, measured on the tiny
DeepSeek-V3 model with the run defaults (bench/update_norms.py, bench/results/update_norms_cpu_*.json:
3 sites of 48, 96 and 160 records, so 6, 12 and 20 DP-SGD steps, epsilon 1 each):
- an honest update's distance from the round's start was 0.58, 0.83, 1.05 (plain LoRA, rounds 1 and
  2; FFA-LoRA's B: 0.44, 0.63, 0.80), ~0.236 x sqrt(steps): it grows with a site's data, the learning
  rate, the epochs and the adapter's size, so no one absolute number fits every run, while the ratio
  to the others' median stays near 1 (0.61-1.51 here). A bound of 10 leaves room for a site with 100x
  the median site's records (the distance goes as the square root of the steps);
- site 0's update scaled x100 was 61x the others' median when its change was scaled (start +
  100 (w - start)) and 550x when its whole adapter was (100 w); FFA-LoRA 61x and 61-90x. In a first
  round of only two sites, where the start is taken as zero (`round_start`), 11x and 99x (FFA: 70x).
Comparing with the *others'* median keeps one outsized update from raising its own yardstick, and
works with two sites; it bounds a minority of outsized updates (fewer than half of the others).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from federation.protocol import wire
from federation.protocol.round_settings import AGGREGATIONS


def weighted_average(updates: list[tuple[wire.Arrays, float]]) -> wire.Arrays:
    """Weighted mean of same-shaped array dicts, accumulated in float64 for exactness."""
    total = float(sum(w for _, w in updates))
    if total <= 0:
        raise ValueError("weights must sum to a positive number")
    out: dict[str, np.ndarray] = {}
    for arrays, weight in updates:
        for name, value in arrays.items():
            acc = out.setdefault(name, np.zeros(value.shape, dtype=np.float64))
            acc += value.astype(np.float64) * (weight / total)
    return {name: acc.astype(np.float32) for name, acc in out.items()}


def _stacked(updates: Sequence[wire.Arrays]) -> dict[str, np.ndarray]:
    """Each tensor name's values across the updates, as one float64 array (update index first)."""
    if not updates:
        raise ValueError("no updates to combine")
    names = set(updates[0])
    if any(set(u) != names for u in updates):
        raise ValueError("updates hold different tensor names")
    return {name: np.stack([np.asarray(u[name], dtype=np.float64) for u in updates]) for name in sorted(names)}


def trimmed_count(n: int, trim_fraction: float) -> int:
    """Values dropped at each end of a coordinate: ceil(trim x n), at least one value left in the middle.

    Rounding up makes a trim above 0 drop one value per end from three updates, where rounding down
    would drop nothing until five; the median (a trimmed mean with the most trimmed) is the limit.
    """
    if not 0 <= trim_fraction < 0.5:
        raise ValueError(f"trim fraction must be in [0, 0.5), not {trim_fraction}")
    return min(math.ceil(trim_fraction * n), (n - 1) // 2)


def trimmed_mean(updates: Sequence[wire.Arrays], *, trim_fraction: float) -> wire.Arrays:
    """Coordinate-wise mean after dropping the `trimmed_count` largest and smallest values."""
    k = trimmed_count(len(updates), trim_fraction)
    out: wire.Arrays = {}
    for name, values in _stacked(updates).items():
        kept = np.sort(values, axis=0)[k : len(updates) - k]
        out[name] = kept.mean(axis=0).astype(np.float32)
    return out


def coordinate_median(updates: Sequence[wire.Arrays]) -> wire.Arrays:
    """Coordinate-wise median (of an even count, the mean of the middle two)."""
    return {name: np.median(values, axis=0).astype(np.float32) for name, values in _stacked(updates).items()}


def combine(updates: list[tuple[wire.Arrays, float]], *, method: str, trim_fraction: float) -> wire.Arrays:
    """Combine (arrays, example count) updates by `method` (one of AGGREGATIONS)."""
    if method == "fedavg":
        return weighted_average(updates)
    if method == "trimmed-mean":
        return trimmed_mean([a for a, _ in updates], trim_fraction=trim_fraction)
    if method == "median":
        return coordinate_median([a for a, _ in updates])
    raise ValueError(f"unknown aggregation {method!r}; expected one of {AGGREGATIONS}")


# ---- bounding update sizes ---------------------------------------------------------------------


def round_start(updates: Sequence[wire.Arrays], start: wire.Arrays | None) -> wire.Arrays:
    """What the round's updates are measured from: the adapter the sites started from (`start`, the
    global one), or in a run's first round, when the coordinator has none, an estimate of it.

    The sites' first round starts from their shared seeded LoRA init, which the coordinator never sees.
    With three or more updates the coordinate-wise median stands in for it (honest updates cluster
    around it; one outsized update cannot move it far); with one or two, zero: LoRA's B starts at zero
    (the same for FFA-LoRA's B-only updates, exactly) and A's seeded init is about the same size at
    every site, so a scaled update still stands out (a 2-site median would be their mean, from which
    both are equally far).
    """
    if start is not None:
        return start
    if len(updates) >= 3:
        return coordinate_median(updates)
    return {name: np.zeros_like(value, dtype=np.float32) for name, value in updates[0].items()} if updates else {}


def distance(arrays: wire.Arrays, start: wire.Arrays) -> float:
    """L2 distance between two same-layout adapters, over all their tensors."""
    total = 0.0
    for name, value in arrays.items():
        diff = np.asarray(value, dtype=np.float64) - np.asarray(start[name], dtype=np.float64)
        total += float(np.dot(diff.ravel(), diff.ravel()))
    return math.sqrt(total)


def outsized(distances: Sequence[float], *, ratio: float) -> dict[int, str]:
    """The updates (by index) whose distance is over `ratio` times the median of the others', each
    with a one-line reason; none when `ratio` is 0 or there is no other update to compare with."""
    if ratio == 0 or len(distances) < 2:
        return {}
    refused: dict[int, str] = {}
    for i, size in enumerate(distances):
        others = float(np.median([d for j, d in enumerate(distances) if j != i]))
        if size > ratio * others:
            times = f"{size / others:.1f}x" if others > 0 else "infinitely"
            refused[i] = (
                f"update norm {size:.4g} is {times} the median {others:.4g} of the other updates' "
                f"(update-norm-ratio {ratio:g}): refused as outsized"
            )
    return refused
