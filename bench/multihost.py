"""Round overhead across separate hosts: a round's wall time beyond the sites' training, with and without a slow wire.

The consortium of the multi-host test (`tests.multihost`: coordinator and three sites, each in a network
namespace of its own behind one switch, certificates naming their addresses, the tiny DeepSeek-V3 model)
is started once; then runs of `--rounds` rounds alternate between a plain network and one where
site-b's wire adds 200 ms delay and 5% loss to everything it sends (`tc netem`, or the harness's relay
where the kernel has no netem), `--repeats` runs of each.

Per round: the wall time at the coordinator (`traffic_by_round` of the run summary: from the previous
round's end, the first from the ServerApp's start, so readiness query, training, upload, aggregation,
registry write and the evaluation/deployment exchange are all in it) and each site's training time (its
audit trail: from the ledger charge to the `train` record). Overhead = wall - the slowest site's
training (the round waits for it). Medians with min and max over all rounds of a condition.

    sudo python -m bench.multihost --out /tmp/multihost-bench --repeats 3 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from bench.common import machine, versions


def _stats(values: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), 2),
        "min": round(min(values), 2),
        "max": round(max(values), 2),
        "n": len(values),
    }


def measure(out: Path, *, repeats: int, rounds: int, delay_ms: float, loss_pct: float) -> dict[str, Any]:
    from node.model import write_tiny_model
    from tests.multihost.consortium import SITES, Consortium, round_walls
    from tests.multihost.hosts import Hosts, wait_for

    out.mkdir(parents=True, exist_ok=True)
    model = write_tiny_model(out / "model" / "tiny-deepseek-v3")
    samples: list[dict[str, Any]] = []
    impairment = "none"
    with Hosts(["coord", *SITES]) as net:
        c = Consortium(net, out / "consortium", model)
        c.prepare()
        net.add_address("coord", c.vip)
        c.start_coordinator("coord")
        for site in SITES:
            c.start_site(site)
        for site in SITES:
            c.wait_site(site)
        wait_for(lambda: c.activated("coord") >= 3, timeout=300, what="three sites connected")
        order = [cond for _ in range(repeats) for cond in ("plain", "delayed")]
        for i, cond in enumerate(order):
            if cond == "delayed":
                impairment = net.netem("site-b", delay_ms=delay_ms, loss_pct=loss_pct, seed=i)
            run = f"bench-{i}-{cond}"
            since = {s: len(c.audit(s)) for s in SITES}
            # A fifth of what is left per run: the repeats never run a site's budget down to a refusal.
            c.submit("coord", run, rounds=rounds, min_nodes=3, extra=("--budget-share", "0.2"))
            wait_for(
                lambda run=run: (c.summary("coord", run) or {}).get("status") in {"finished", "failed"},
                timeout=1800,
                what=run,
                interval=0.5,
            )
            summary = c.summary("coord", run) or {}
            if cond == "delayed":
                net.clear_netem("site-b")
            assert summary.get("status") == "finished", summary.get("error")
            train = {s: c.train_seconds(s, since=since[s]) for s in SITES}
            for rnd, wall in enumerate(round_walls(summary), start=1):
                per_site = {s: t[rnd] for s, t in train.items() if rnd in t}
                slowest = max(per_site.values())
                sample = {
                    "condition": cond,
                    "run": run,
                    "round": rnd,
                    "wall_s": round(wall, 3),
                    "train_s": {s: round(v, 3) for s, v in per_site.items()},
                    "overhead_s": round(wall - slowest, 3),
                }
                samples.append(sample)
                print(json.dumps(sample), flush=True)
            time.sleep(2)
    summary_by = {}
    for cond in ("plain", "delayed"):
        rows = [s for s in samples if s["condition"] == cond]
        summary_by[cond] = {
            "wall_s": _stats([r["wall_s"] for r in rows]),
            "slowest_train_s": _stats([max(r["train_s"].values()) for r in rows]),
            "overhead_s": _stats([r["overhead_s"] for r in rows]),
            "overhead_first_round_s": _stats([r["overhead_s"] for r in rows if r["round"] == 1]),
            "overhead_later_rounds_s": _stats([r["overhead_s"] for r in rows if r["round"] > 1] or [float("nan")]),
        }
    return {
        "benchmark": "multihost round overhead",
        "machine": machine("cpu"),
        "versions": versions("flwr", "torch"),
        "setup": {
            "hosts": "coordinator + 3 sites, one network namespace each, veth pairs to one Linux bridge",
            "impairment": f"site-b egress: {delay_ms:g} ms delay, {loss_pct:g}% loss, via {impairment}",
            "rounds_per_run": rounds,
            "repeats": repeats,
            "min_nodes": 3,
        },
        "summary": summary_by,
        "samples": samples,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--delay-ms", type=float, default=200.0)
    parser.add_argument("--loss-pct", type=float, default=5.0)
    parser.add_argument("--result", type=Path, default=Path("bench/results/multihost_cpu_2026-12-06.json"))
    args = parser.parse_args()
    result = measure(args.out, repeats=args.repeats, rounds=args.rounds, delay_ms=args.delay_ms, loss_pct=args.loss_pct)
    args.result.parent.mkdir(parents=True, exist_ok=True)
    args.result.write_text(json.dumps(result, indent=2))
    print(json.dumps(result["summary"], indent=2))


if __name__ == "__main__":
    main()
