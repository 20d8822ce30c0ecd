"""Random adapter arrays shaped like a host's: distinct, reproducible versions to deploy and compare."""

from __future__ import annotations

import numpy as np

from federation.protocol import wire


def random_arrays(like: wire.Arrays, *, seed: int, scale: float = 0.05) -> wire.Arrays:
    rng = np.random.default_rng(seed)
    return {k: rng.normal(0.0, scale, v.shape).astype(np.float32) for k, v in like.items()}
