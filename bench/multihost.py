"""Round overhead across separate hosts: a round's wall time beyond the sites' training, with and without a slow wire.

The consortium of the multi-host test (`tests.multihost`: coordinator and three sites, each in a network
namespace of its own behind one switch, certificates naming their addresses, the tiny DeepSeek-V3 model)
is started once; then runs of `--rounds` rounds alternate between a plain network and one where
site-b's wire adds 200 ms delay and 5% loss to everything it sends (`tc netem`, or the harness's relay
where the kernel has no netem), `--repeats` runs of each, all three sites in every round (min-nodes 3).

Per round, from what the parties recorded: the wall time at the coordinator (the round record's
`duration_s`: readiness query, training, upload, aggregation, registry write and the evaluation and
deployment exchange), the seconds the coordinator waited in each exchange (`query`, `train`,
`evaluate`, from the run summary's `traffic_by_round`) and each site's training time (its audit trail:
from the ledger charge to the `train` record). Overhead = wall - the slowest site's training (the round
waits for it). Medians with min and max over all rounds of a condition.

    sudo python -m bench.multihost --out /tmp/multihost-bench --repeats 3 --rounds 2
    python -m bench.multihost --reanalyse /tmp/multihost-bench   # the numbers again, from the records
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from pathlib import Path
from typing import Any

from bench.common import machine, versions

CONDITIONS = ("plain", "delayed")
RUN_NAME = re.compile(r"^bench-(\d+)-(plain|delayed)$")


def _stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    return {
        "median": round(statistics.median(values), 2),
        "min": round(min(values), 2),
        "max": round(max(values), 2),
        "n": len(values),
    }


def phase_seconds(summary: dict[str, Any]) -> list[dict[str, float]]:
    """Per round, the seconds the coordinator spent waiting in each exchange with the sites: `query`
    (readiness), `train` (instruction out, update back: the sites' training is inside it), `evaluate`
    (deploy and score the new version); from the cumulative `traffic_by_round` of the run summary."""
    out: list[dict[str, float]] = []
    before: dict[str, Any] = {}
    for rec in summary.get("traffic_by_round", []):
        now = rec["traffic"]
        out.append(
            {k: round(float(v["seconds"]) - float(before.get(k, {}).get("seconds", 0.0)), 3) for k, v in now.items()}
        )
        before = now
    return out


def analyse(consortium_root: Path) -> list[dict[str, Any]]:
    """One sample per round of every `bench-N-COND` run, from the coordinator's run summaries and the
    sites' audit trails under `consortium_root` (what `measure` leaves there)."""
    from tests.multihost.consortium import SITES, Consortium, round_walls

    runs_dir = consortium_root / "hosts" / "coord" / "state" / "registry" / "runs"
    found = [(int(m.group(1)), m.group(2), p) for p in runs_dir.glob("bench-*.json") if (m := RUN_NAME.match(p.stem))]
    train_by_run: dict[str, dict[str, dict[int, float]]] = {}
    for site in SITES:
        for key, per_round in Consortium.train_seconds_by_run(consortium_root / "hosts" / site).items():
            train_by_run.setdefault(key, {})[site] = per_round
    samples: list[dict[str, Any]] = []
    for _, cond, path in sorted(found):
        summary = json.loads(path.read_text())
        if summary.get("status") != "finished":
            continue
        train = train_by_run.get(str(summary.get("run_key")), {})
        phases = phase_seconds(summary)
        for rnd, wall in enumerate(round_walls(summary), start=1):
            per_site = {s: t[rnd] for s, t in train.items() if rnd in t}
            samples.append(
                {
                    "condition": cond,
                    "run": path.stem,
                    "round": rnd,
                    "wall_s": round(wall, 3),
                    "train_s": {s: round(v, 3) for s, v in sorted(per_site.items())},
                    "overhead_s": round(wall - max(per_site.values()), 3),
                    "phases_s": phases[rnd - 1],
                }
            )
    return samples


def summarise(samples: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for cond in CONDITIONS:
        rows = [s for s in samples if s["condition"] == cond]
        out[cond] = {
            "wall_s": _stats([r["wall_s"] for r in rows]),
            "slowest_train_s": _stats([max(r["train_s"].values()) for r in rows]),
            "overhead_s": _stats([r["overhead_s"] for r in rows]),
            "overhead_first_round_s": _stats([r["overhead_s"] for r in rows if r["round"] == 1]),
            "overhead_later_rounds_s": _stats([r["overhead_s"] for r in rows if r["round"] > 1]),
            "phases_s": {k: _stats([r["phases_s"][k] for r in rows]) for k in ("query", "train", "evaluate")},
        }
    return out


def measure(out: Path, *, repeats: int, rounds: int, delay_ms: float, loss_pct: float) -> str:
    """Run the consortium and the alternating runs; returns the impairment used ("netem" or "relay")."""
    from node.model import write_tiny_model
    from tests.multihost.consortium import SITES, Consortium
    from tests.multihost.hosts import Hosts, wait_for

    out.mkdir(parents=True, exist_ok=True)
    model = write_tiny_model(out / "model" / "tiny-deepseek-v3")
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
        for i, cond in enumerate(cond for _ in range(repeats) for cond in CONDITIONS):
            if cond == "delayed":
                impairment = net.netem("site-b", delay_ms=delay_ms, loss_pct=loss_pct, seed=i)
            run = f"bench-{i}-{cond}"
            # A fifth of what is left per run: the repeats never run a site's budget down to a refusal.
            c.submit("coord", run, rounds=rounds, min_nodes=3, extra=("--budget-share", "0.2"))
            summary = wait_for(
                lambda run=run: s if (s := c.summary("coord", run)) and s.get("status") != "running" else None,
                timeout=1800,
                what=run,
                interval=0.5,
            )
            if cond == "delayed":
                net.clear_netem("site-b")
            assert summary.get("status") == "finished", summary.get("error")
            print(json.dumps({"run": run, "round_s": [r.get("duration_s") for r in summary["rounds"]]}), flush=True)
            time.sleep(2)
    return impairment


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="where the consortium runs (its records stay there)")
    parser.add_argument("--reanalyse", type=Path, metavar="OUT", help="only compute the numbers from OUT's records")
    parser.add_argument("--impairment", default="", help="with --reanalyse: what delayed the wire (netem or relay)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--delay-ms", type=float, default=200.0)
    parser.add_argument("--loss-pct", type=float, default=5.0)
    parser.add_argument("--result", type=Path, default=Path("bench/results/multihost_cpu_2026-12-06.json"))
    args = parser.parse_args()
    if args.reanalyse is None and args.out is None:
        parser.error("give --out DIR (measure) or --reanalyse DIR")
    out = args.reanalyse or args.out
    impairment = args.impairment
    if args.reanalyse is None:
        impairment = measure(
            args.out, repeats=args.repeats, rounds=args.rounds, delay_ms=args.delay_ms, loss_pct=args.loss_pct
        )
    samples = analyse(out / "consortium")
    result = {
        "benchmark": "multihost round overhead (bench/multihost.py)",
        "machine": machine("cpu"),
        "versions": versions("flwr", "torch"),
        "setup": {
            "hosts": "coordinator + 3 sites, one network namespace each, veth pairs to one Linux bridge",
            "impairment": f"site-b egress: {args.delay_ms:g} ms delay, {args.loss_pct:g}% loss, via {impairment}",
            "min_nodes": 3,
            "runs": sorted({s["run"] for s in samples}),
        },
        "summary": summarise(samples),
        "samples": samples,
    }
    args.result.parent.mkdir(parents=True, exist_ok=True)
    args.result.write_text(json.dumps(result, indent=2))
    print(json.dumps(result["summary"], indent=2))


if __name__ == "__main__":
    main()
