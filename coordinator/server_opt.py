"""The coordinator's step from a round's combined update to the next global adapter (FedOpt).

With the round's combined adapter ``m`` (FedAvg's weighted mean, or a robust aggregate) and the
previous global adapter ``x``, ``d = m - x`` is the pseudo-gradient (Reddi et al. 2021, "Adaptive
Federated Optimization"). ``fedavg`` takes ``x + lr d`` (lr 1: ``m`` itself, bit for bit);
``fedavgm`` keeps a velocity ``v = momentum v + d`` and takes ``x + lr v``; ``fedadam`` takes
``x + lr mom1 / (sqrt(mom2) + tau)`` with ``mom1 = beta1 mom1 + (1 - beta1) d`` and
``mom2 = beta2 mom2 + (1 - beta2) d^2``.

Why a server step under DP: each site's update is already noised (DP-SGD), so the step is
post-processing and spends no privacy budget, while momentum averages the noise of successive
rounds. On the usefulness benchmark's hardest data seed (H100, 2026-12-06, 8 rounds, epsilon 1)
FedAvgM 0.9 lifted the federation from 0.87 to 0.90 of pooled exact match (mean of repeats); at 4
rounds it hurt (0.74), since momentum carries round 1's noise forward (BENCHMARKS.md).

State lives for one submission: a run resumed with ``fedseek run --resume`` starts with zero
velocity from its last saved version. Round 1 of a run with no parent version has no previous
adapter at the coordinator; LoRA's B starts at zero at every site, so B's pseudo-gradient is ``m``
itself; A's seeded init is the sites' own, so a trained A takes ``m`` in round 1 and is stepped
from round 2 (under FFA-LoRA A is frozen and never stepped).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from federation.protocol import wire
from federation.protocol.round_settings import SERVER_OPTS, RunSettings

__all__ = ["ServerOpt", "ServerState"]


@dataclass(frozen=True)
class ServerOpt:
    """Which step and its hyper-parameters (RunSettings `server-opt`, `server-lr`, `server-momentum`)."""

    kind: str = "fedavg"
    lr: float = 1.0
    momentum: float = 0.9
    """FedAvgM's momentum; FedAdam's beta1."""
    beta2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        if self.kind not in SERVER_OPTS:
            raise ValueError(f"server optimizer {self.kind!r}: expected one of {', '.join(SERVER_OPTS)}")
        if not (self.lr > 0 and 0 <= self.momentum < 1 and 0 <= self.beta2 < 1 and self.tau > 0):
            raise ValueError(f"server optimizer settings out of range: {self}")

    @classmethod
    def of(cls, settings: RunSettings) -> ServerOpt:
        return cls(kind=settings.server_opt, lr=settings.server_lr, momentum=settings.server_momentum)

    @property
    def is_plain_mean(self) -> bool:
        return self.kind == "fedavg" and self.lr == 1.0

    def describe(self) -> str:
        if self.kind == "fedavg":
            return "FedAvg" if self.lr == 1.0 else f"FedAvg, server lr {self.lr:g}"
        if self.kind == "fedavgm":
            return f"FedAvgM, server lr {self.lr:g}, momentum {self.momentum:g}"
        return f"FedAdam, server lr {self.lr:g}, beta1 {self.momentum:g}, beta2 {self.beta2:g}, tau {self.tau:g}"


class ServerState:
    """The server optimizer's state over one submission of a run (a velocity, or two moments, per tensor)."""

    def __init__(self, opt: ServerOpt, *, frozen_a: bool) -> None:
        self.opt = opt
        self.frozen_a = frozen_a  # FFA-LoRA: A is the seeded init, never stepped
        self.mom1: dict[str, np.ndarray] = {}
        self.mom2: dict[str, np.ndarray] = {}

    def step(self, previous: wire.Arrays | None, combined: wire.Arrays) -> wire.Arrays:
        """The next global adapter from the previous one (None: round 1 from the seeded init) and the
        round's combined adapter, over the tensors `combined` holds."""
        if self.opt.is_plain_mean:
            return combined  # bit for bit the plain aggregate
        o = self.opt
        out: wire.Arrays = {}
        for name, value in combined.items():
            factor = wire.factor_of(name)
            if (factor == "A" and self.frozen_a) or (previous is None and factor != "B"):
                out[name] = value  # frozen, or its init is the sites' own (only B's is zero): stepped from round 2
                continue
            x = np.zeros(value.shape, np.float64) if previous is None else np.asarray(previous[name], np.float64)
            d = np.asarray(value, dtype=np.float64) - x
            if o.kind == "fedavg":
                new = x + o.lr * d
            elif o.kind == "fedavgm":
                v = self.mom1[name] = o.momentum * self.mom1.get(name, np.zeros_like(d)) + d
                new = x + o.lr * v
            else:
                m1 = self.mom1[name] = o.momentum * self.mom1.get(name, np.zeros_like(d)) + (1 - o.momentum) * d
                m2 = self.mom2[name] = o.beta2 * self.mom2.get(name, np.zeros_like(d)) + (1 - o.beta2) * d * d
                new = x + o.lr * m1 / (np.sqrt(m2) + o.tau)
            out[name] = new.astype(np.float32)
        return out
