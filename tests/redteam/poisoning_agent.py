"""A site's real node agent that poisons its update: x`--factor` its change from the adapter it trained from.

`python -m tests.redteam.poisoning_agent --config node.json --factor 100` runs `fedseek node start` in
this process after replacing `node.service.train_round` with a wrapper that trains honestly (DP-SGD,
ledger charged, as a real site) and then scales what the round changed. The hook lives here, in the
test, because the product has none and must not have one: a real poisoner changes its own copy of the
software, which the coordinator cannot see either; all the coordinator has is the update it receives.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

import numpy as np


def install(factor: float) -> None:
    import node.service
    from node.trainer import RoundResult

    honest = node.service.train_round

    def poisoned(*args: Any, **kwargs: Any) -> RoundResult:
        result = honest(*args, **kwargs)
        start = kwargs["global_arrays"] or args[0].initial_arrays()  # the host: the seeded init in round 1
        scale = np.float32(factor)
        arrays = {k: (start[k] + scale * (v - start[k])).astype(np.float32) for k, v in result.arrays.items()}
        return dataclasses.replace(result, arrays=arrays)

    node.service.train_round = poisoned  # type: ignore[assignment]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True)
    parser.add_argument("--factor", type=float, default=100.0)
    args = parser.parse_args()
    install(args.factor)
    from federation.cli.main import main as fedseek

    return fedseek(["node", "start", "--config", args.config])


if __name__ == "__main__":
    sys.exit(main())
