"""Shapley values of a game over prompt features, from coalitions chosen before any is scored.

Both estimators here pick every coalition up front, so an explanation's model evaluations can
be scored in as few model calls as memory allows (shap's Partition explainer picks each batch
from the previous one's results, so its calls are sequential and the accelerator idles between
them).

* ``exact_shapley``: all ``2**n`` coalitions, the Shapley value by its definition.
* ``kernel_coalitions`` + ``kernel_shap``: KernelSHAP (Lundberg & Lee 2017), the Shapley value as
  the solution of a weighted least-squares problem over sampled coalitions, with the two
  refinements that make it accurate at small budgets (Covert & Lee 2021): *paired* sampling
  (every coalition with its complement) and *exact* enumeration of the smallest and largest
  coalition sizes whenever the budget covers them (as shap's KernelExplainer does), the rest
  sampled without replacement in proportion to the Shapley kernel. Efficiency is a constraint
  of the fit, so the values always sum to ``v(all) - v(none)``.
"""

from __future__ import annotations

import itertools
import math

import numpy as np


def exact_shapley(values: np.ndarray, n: int) -> np.ndarray:
    """``(n, T)`` Shapley values from ``values[c]``, the game's value of coalition bitmask ``c``."""
    values = np.asarray(values, dtype=np.float64)
    if values.shape[0] != 2**n:
        raise ValueError(f"need all {2**n} coalitions, got {values.shape[0]}")
    weights = np.array([math.factorial(s) * math.factorial(n - s - 1) / math.factorial(n) for s in range(n)])
    coalitions = np.arange(2**n)
    sizes = np.array([int(c).bit_count() for c in coalitions])
    phi = np.zeros((n, *values.shape[1:]))
    for i in range(n):
        without = coalitions[(coalitions >> i) & 1 == 0]
        w = weights[sizes[without]].reshape(-1, *([1] * (values.ndim - 1)))
        phi[i] = (w * (values[without | (1 << i)] - values[without])).sum(axis=0)
    return phi


def kernel_coalitions(n: int, budget: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``(masks (k, n) bool, weights (k,))``: at most ``budget`` coalitions other than none and all.

    Sizes s and n - s form one stratum (complements are paired); the Shapley kernel gives size s
    the total weight (n - 1) / (s (n - s)). Strata are enumerated completely from the outside in
    while the budget covers a stratum's share (weight: the kernel's per coalition); the remaining
    budget samples the remaining strata in proportion to their weight, each sampled coalition
    together with its complement, repeats counted (weight: the remaining total by count).
    """
    if n < 2:
        raise ValueError("KernelSHAP needs at least two features")
    kernel = {s: (n - 1) / (s * (n - s)) for s in range(1, n)}
    strata = [(s, n - s) for s in range(1, n // 2 + 1)]
    weight = {st: kernel[st[0]] + (kernel[st[1]] if st[0] != st[1] else 0.0) for st in strata}
    masks: list[np.ndarray] = []
    weights: list[float] = []
    left = budget
    remaining = list(strata)
    while remaining:
        st = remaining[0]
        count = sum(math.comb(n, s) for s in set(st))
        share = left * weight[st] / sum(weight[x] for x in remaining)
        if count > left or share < count - 1e-8:
            break
        for s in sorted(set(st)):
            per = kernel[s] / math.comb(n, s)
            for members in itertools.combinations(range(n), s):
                z = np.zeros(n, dtype=bool)
                z[list(members)] = True
                masks.append(z)
                weights.append(per)
        left -= count
        remaining.pop(0)
    if remaining and left >= 2:
        p = np.array([weight[x] for x in remaining])
        p /= p.sum()
        drawn: dict[bytes, np.ndarray] = {}
        counts: dict[bytes, int] = {}
        tries = 0
        while left >= 2 and tries < 50 * budget:
            tries += 1
            s, t = remaining[int(rng.choice(len(remaining), p=p))]
            z = np.zeros(n, dtype=bool)
            z[rng.choice(n, size=s if rng.random() < 0.5 else t, replace=False)] = True
            for c in (z, ~z):  # a repeat (itself or as a complement) adds weight, not an evaluation
                key = c.tobytes()
                counts[key] = counts.get(key, 0) + 1
                if key not in drawn:
                    drawn[key] = c
                    left -= 1
        total = sum(counts.values())
        rest = sum(weight[x] for x in remaining)
        for key, c in drawn.items():
            masks.append(c)
            weights.append(rest * counts[key] / total)
    if not masks:
        return np.zeros((0, n), dtype=bool), np.zeros(0)
    return np.array(masks), np.array(weights)


def kernel_shap(
    masks: np.ndarray, weights: np.ndarray, values: np.ndarray, base: np.ndarray, full: np.ndarray
) -> np.ndarray:
    """``(n, T)`` KernelSHAP values: the weighted least-squares fit of ``values - base`` by sums of
    per-feature values over each coalition, constrained to sum to ``full - base`` (efficiency)."""
    z = np.asarray(masks, dtype=np.float64)
    k, n = z.shape
    y = np.asarray(values, dtype=np.float64).reshape(k, -1) - np.asarray(base, dtype=np.float64).reshape(1, -1)
    delta = (np.asarray(full, dtype=np.float64) - np.asarray(base, dtype=np.float64)).reshape(1, -1)
    if n == 1:
        return delta.copy()
    # phi_last = delta - sum(others): a plain least-squares problem in the other n - 1 values.
    a = z[:, :-1] - z[:, -1:]
    b = y - z[:, -1:] * delta
    root = np.sqrt(np.asarray(weights, dtype=np.float64))[:, None]
    head, *_ = np.linalg.lstsq(a * root, b * root, rcond=None)
    return np.vstack([head, delta - head.sum(axis=0, keepdims=True)])
