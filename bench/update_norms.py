"""Update norms: how far honest DP-LoRA updates move, and how far one scaled x100 does.

What `update-norm-ratio` (RunSettings, coordinator/aggregate.py) is set from. Three sites of 48, 96
and 160 demo records on the tiny DeepSeek-V3 model train two rounds each with the node's own DP-SGD
path (`node.trainer.train_round`, run defaults: batch 8, lr 2e-3, one epoch, epsilon 1 per site),
round 2 from the FedAvg of round 1, as the coordinator would. For each round it reports each update's
distance from the round's start (`coordinator.aggregate.round_start`: the global adapter, or in round 1
the median of three) and its ratio to the median of the others' (`outsized`'s yardstick), then the same
ratio for site 0's update scaled x100 two ways: its change (start + 100 (w - start)) and its whole
adapter (100 w), among the two honest others; and round 1 again with only two updates (start: zero).

    .venv/bin/python bench/update_norms.py [--ffa] [--out bench/results/update_norms_cpu_DATE.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: the repo's packages

from bench.common import machine, versions
from coordinator.aggregate import distance, round_start, weighted_average
from federation.protocol import wire

SIZES = (48, 96, 160)


def _ratios(updates: list[wire.Arrays], start: wire.Arrays | None) -> list[float]:
    origin = round_start(updates, start)
    sizes = [distance(u, origin) for u in updates]
    return [sizes[i] / float(np.median([d for j, d in enumerate(sizes) if j != i])) for i in range(len(sizes))]


def _poisoned(update: wire.Arrays, start: wire.Arrays) -> dict[str, wire.Arrays]:
    x100 = np.float32(100)
    return {
        "change_x100": {k: start[k] + x100 * (v - start[k]) for k, v in update.items()},
        "weights_x100": {k: x100 * v for k, v in update.items()},
    }


def measure(*, ffa: bool) -> dict[str, Any]:
    from fedseek_examples.demo.data import write_site_dataset

    from node.data import load_jsonl, tokenize
    from node.engine import ModelHost
    from node.model import load_model, write_tiny_model
    from node.trainer import TrainSettings, train_round
    from privacy.ledger import Budget, PrivacyLedger

    torch.set_num_threads(1)
    part = wire.lora_b if ffa else dict  # what the coordinator averages and bounds
    rounds: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="update-norms-") as tmp_dir:
        tmp = Path(tmp_dir)
        model, tok = load_model(write_tiny_model(tmp / "tiny-deepseek-v3"))
        host = ModelHost(model, tok, model_name="tiny-deepseek-v3")
        data, ledgers = [], []
        for i, n in enumerate(SIZES):
            write_site_dataset(tmp / f"site{i}", site_index=i, n_sites=len(SIZES), n_train=n, n_eval=4)
            data.append(tokenize(load_jsonl(tmp / f"site{i}" / "train.jsonl"), tok))
            ledgers.append(PrivacyLedger(tmp / f"ledger{i}.sqlite", budget=Budget(epsilon=1.0, delta=1 / (10 * n))))
        settings = TrainSettings(freeze_lora_a=ffa)
        global_arrays: wire.Arrays | None = None
        for server_round in (1, 2):
            results = [
                train_round(
                    host,
                    ledgers[i],
                    data[i],
                    site=f"site-{i}",
                    run_id="bench",
                    round=server_round,
                    rounds_left=3 - server_round,
                    global_arrays=global_arrays,
                    settings=settings,
                )
                for i in range(len(SIZES))
            ]
            updates = [part(r.arrays) for r in results]
            start = part(global_arrays) if global_arrays is not None else None
            origin = round_start(updates, start)
            known = part(global_arrays) if global_arrays is not None else part(host.initial_arrays())
            row: dict[str, Any] = {
                "round": server_round,
                "steps": [r.report.steps for r in results],
                "noise_multiplier": [round(r.report.noise_multiplier, 3) for r in results],
                "distance_from_start": [round(distance(u, origin), 4) for u in updates],
                "distance_from_true_start": [round(distance(u, known), 4) for u in updates],
                "honest_ratio_to_others_median": [round(x, 3) for x in _ratios(updates, start)],
            }
            for label, poisoned in _poisoned(updates[0], known).items():
                row[f"{label}_ratio"] = round(_ratios([poisoned, *updates[1:]], start)[0], 1)
                if start is None:  # a first round of two sites: the start is taken as zero
                    row[f"{label}_ratio_two_sites"] = round(_ratios([poisoned, updates[1]], None)[0], 1)
            rounds.append(row)
            print(json.dumps(row))
            global_arrays = weighted_average([(r.arrays, float(n)) for r, n in zip(results, SIZES, strict=True)])
    return {"ffa_lora": ffa, "sites_records": list(SIZES), "rounds": rounds}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    now = datetime.now(UTC)
    out = args.out or Path(__file__).parent / "results" / f"update_norms_cpu_{now:%Y-%m-%d}.json"
    res = {
        "benchmark": "update_norms",
        "date": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine("cpu"),
        "runs": [measure(ffa=False), measure(ffa=True)],
        "versions": versions("torch", "opacus", "peft", "transformers"),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(f"wrote {out}")
    return res


if __name__ == "__main__":
    main()
