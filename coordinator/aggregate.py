"""The federated mean of LoRA updates, free of Flower so benchmarks and tools can import it anywhere.

`coordinator.strategy.LoraFedAvg` aggregates with this function (and re-exports it); keeping it
here lets `bench/usefulness.py` compute exactly the coordinator's average on a machine without
`flwr` installed.
"""

from __future__ import annotations

import numpy as np

from federation.protocol import wire


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
