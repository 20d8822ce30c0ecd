"""SecAgg+'s mask generator with the whole 256-bit seed: Flower 1.42's keeps only 32 bits of it.

`flwr.common.secure_aggregation.secaggplus_utils.pseudo_rand_gen` XOR-folds the seed (a 32-byte
pairwise shared key, or a site's private mask seed) into one 32-bit integer and seeds numpy's
MT19937 with it: a mask is one of 2**32 streams. A coordinator that colludes with one site knows that
site's pairwise mask with a third site and, after unmasking, the third site's private mask; the one
pairwise mask left is then a 2**32 search, checked cheaply because a quantised value lies in [0, Q)
with Q = 2**30 of 2**32. That recovers the third site's update, which SecAgg+ exists to hide.

`strong_masks` draws the same shape of uniform integers from SHAKE-256 over the full seed (domain-
separated), and `harden` installs it in the module of Flower's SecAgg+ that a process uses: the
ClientApp's mod (node/secagg.py) and the ServerApp's workflow (coordinator/secagg.py). Both ends of a
FedSeek run load the consortium's signed app, so both use it; a party with unpatched Flower would
produce masks that do not cancel: the sum's check value (`CHECK_VALUE`) then comes out wrong and the
coordinator refuses the round instead of saving noise as an adapter.
"""

from __future__ import annotations

import hashlib
import math
from types import ModuleType
from typing import Any

import numpy as np
from numpy.typing import NDArray

DOMAIN = b"fedseek/secagg+/mask/v1\x00"

MIN_SITES = 3
"""Fewest sites in a SecAgg+ round: with 2, the sum minus its own update hands each site the other's (3 also
lets one drop out). The coordinator refuses rounds with fewer ready sites; a site refuses such a setup."""


def unsafe_setup(*, sites: int, shares: int, threshold: int) -> str:
    """Why a SecAgg+ setup is unsafe for a site to join ("" if safe). With a threshold of at most half the
    shares, a coordinator that tells some neighbours a site dropped out (they send its key share) and the
    others that it is alive (they send its mask-seed share) could rebuild both secrets and unmask it."""
    if sites < MIN_SITES:
        return f"secure aggregation among {sites} sites; at least {MIN_SITES} needed"
    if threshold < 2 or 2 * threshold <= shares:
        return f"secure aggregation threshold {threshold} of {shares} shares would let one site's secrets be rebuilt"
    return ""


CHECK_VALUE = 0.5
"""Every site appends this constant to the vector it masks (node/secagg.py); the coordinator's unmasked mean
of it must be this value within the fixed-point error bound (coordinator/secagg.py), or the masks did not
cancel (a party with another mask generator, a protocol fault) and the round's sum is refused."""


def strong_masks(seed: bytes, num_range: int, dimensions_list: list[tuple[int, ...]]) -> list[NDArray[np.int64]]:
    """Uniform integers in [0, num_range) of the given shapes, from SHAKE-256(DOMAIN || seed).

    The signature is Flower's `pseudo_rand_gen`'s. Eight bytes per value reduced mod num_range (at most
    2**32): the bias is below 2**-32.
    """
    if not 1 < num_range <= 2**32:
        raise ValueError(f"mask range {num_range} outside (1, 2**32]")
    sizes = [math.prod(d) for d in dimensions_list]  # () -> 1: a scalar
    stream = hashlib.shake_256(DOMAIN + bytes(seed)).digest(8 * sum(sizes))
    values = (np.frombuffer(stream, dtype="<u8") % np.uint64(num_range)).astype(np.int64)
    out: list[NDArray[np.int64]] = []
    offset = 0
    for dims, size in zip(dimensions_list, sizes, strict=True):
        chunk = values[offset : offset + size]
        offset += size
        out.append(np.array(chunk[0], dtype=np.int64) if len(dims) == 0 else chunk.reshape(dims))
    return out


def harden(module: ModuleType) -> None:
    """Make `module` (Flower's secaggplus_mod or secaggplus_workflow) draw its masks from `strong_masks`."""
    current: Any = getattr(module, "pseudo_rand_gen", None)
    if current is None:  # Flower moved it: refuse to run SecAgg+ with masks we did not check
        raise ImportError(f"{module.__name__} has no pseudo_rand_gen to replace; check Flower's SecAgg+ masks")
    module.pseudo_rand_gen = strong_masks  # type: ignore[attr-defined]
