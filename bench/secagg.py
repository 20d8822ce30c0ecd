"""Round time and bytes of plain FedAvg vs SecAgg+ (`fedseek run --secagg`) on the 3-site CPU demo setup.

One consortium (coordinator, three `fedseek node start` agents on the tiny model, the demo's data) serves
every run; each run is one round with all three sites, alternating plain and secure, `--repeats` of each.
Per run: wall time of `coordinator.runs.run` (submit to summary, app start-up included), and from the
run summary's `traffic` (coordinator/grid_meter.py: Flower's serialized bytes the coordinator pushed and
pulled, and the seconds its send_and_receive calls took) the train phase (SecAgg+'s four stages, or the
one train exchange), the readiness query and the evaluation. Medians with min and max.

It also measures SecAgg+'s fixed-point error on the protocol's own arithmetic (Flower's quantize and
dequantize, masks omitted: they cancel exactly in the integers) for three sites with LoRA-sized values,
against the float64 weighted mean, next to the bound coordinator/secagg.py states.

    python -m bench.secagg --out /tmp/secagg-bench --repeats 3 [--ffa-lora]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import machine, versions


def fixed_point_error(*, sites: int = 3, size: int = 200_000, seed: int = 0) -> dict[str, float]:
    """Max |SecAgg+ mean - float64 weighted mean| over `size` LoRA-sized values per site, and the stated bound."""
    from flwr.common.secure_aggregation.quantization import dequantize, quantize

    from coordinator.secagg import CLIPPING_RANGE, error_bound, quantization_range

    rng = np.random.default_rng(seed)
    q = quantization_range(sites)
    examples = rng.integers(40, 400, size=sites)
    max_weight = float(examples.max())
    updates = [(rng.standard_normal(size) * 0.05).astype(np.float32) for _ in range(sites)]
    total = np.zeros(size, dtype=np.int64)
    ratios = []
    for n, x in zip(examples, updates, strict=True):  # node/secagg.py -> secaggplus_mod, per site
        q_ratio = round(n / max_weight * q)
        ratios.append(q_ratio)
        total += quantize([x.astype(np.float64) * (q_ratio / q)], CLIPPING_RANGE, q)[0].astype(np.int64)
    total %= 2**32
    mean = dequantize([total], CLIPPING_RANGE, q)[0]  # the workflow's unmask stage
    mean = (mean - (sites - 1) * CLIPPING_RANGE) * (q / sum(ratios))
    exact = sum(n * x.astype(np.float64) for n, x in zip(examples, updates, strict=True)) / examples.sum()
    bound = error_bound(sites=sites, weight_sum=float(examples.sum()) / max_weight, q=q)
    return {
        "max_abs_error": float(np.abs(mean - exact).max()),
        "max_abs_error_float32": float(np.abs(mean.astype(np.float32) - exact.astype(np.float32)).max()),
        "bound": bound,
        "values_per_site": size,
        "value_scale": 0.05,
    }


def _stats(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def run_bench(out: Path, *, repeats: int, rounds: int, ffa: bool, n_train: int) -> dict[str, Any]:
    from fedseek_examples.demo.run import DemoSettings, _fedseek, _prepare, _sign_app, _wait_file

    from coordinator.runs import run
    from federation.ops.layout import CoordinatorLayout, NodeLayout
    from federation.ops.supervise import Managed, free_port, stop_all
    from federation.protocol import config as cfg
    from federation.protocol.round_settings import RunSettings

    out = out.resolve()
    demo = DemoSettings(out=out, sites=3, n_train=n_train, n_eval=16)
    names = [f"hospital-{c}" for c in "abc"]
    model_dir, pki_dir = _prepare(demo, names)
    procs: list[Managed] = []
    runs: list[dict[str, Any]] = []
    try:
        fleet_port = free_port()
        coord_state = out / "coordinator"
        _sign_app(out, pki_dir, CoordinatorLayout(coord_state).signed_app)
        argv = ["coordinator", "start", "--pki", str(pki_dir), "--state", str(coord_state)]
        coordinator = Managed(
            name="coordinator",
            argv=_fedseek(*argv, "--fleet-port", str(fleet_port)),
            log_path=out / "logs" / "coordinator.log",
        ).start()
        procs.append(coordinator)
        _wait_file(CoordinatorLayout(coord_state).endpoints, coordinator, timeout=300)
        states = []
        for name in names:
            site = out / "sites" / name
            conf = cfg.NodeConfig(
                name=name,
                model_dir=str(model_dir),
                data_dir=str(site / "data"),
                state_dir=str(site / "state"),
                pki_dir=str(pki_dir),
                coordinator=f"127.0.0.1:{fleet_port}",
                api_port=free_port(),
            )
            cfg.save(conf, site / "node.json")
            argv = ["node", "start", "--config", str(site / "node.json")]
            procs.append(Managed(name=name, argv=_fedseek(*argv), log_path=out / "logs" / f"{name}.log").start())
            states.append(site / "state")
        for state, proc in zip(states, procs[1:], strict=True):
            _wait_file(NodeLayout(state).endpoints, proc, timeout=300)
        for i in range(repeats):
            for secagg in (False, True) if i % 2 == 0 else (True, False):  # alternate: no order bias
                mode = "secagg" if secagg else "plain"
                settings = RunSettings(
                    run_name=f"bench-{mode}-{i}", num_rounds=rounds, min_nodes=3, ffa_lora=ffa, secagg=secagg
                )
                start = time.monotonic()
                summary = run(coord_state, settings=settings, timeout=1800)
                wall = time.monotonic() - start
                runs.append(
                    {
                        "mode": mode,
                        "repeat": i,
                        "status": summary["status"],
                        "wall_s": wall,
                        "accepted": [r["accepted"] for r in summary["rounds"]],
                        "traffic": summary["traffic"],
                        "traffic_by_round": summary.get("traffic_by_round", []),
                        "secagg": [r.get("secagg", {}) for r in summary["rounds"]],
                    }
                )
                print(json.dumps({k: runs[-1][k] for k in ("mode", "repeat", "status", "wall_s")}), flush=True)
    finally:
        stop_all(procs)
    return {"runs": runs}


def round_phases(run: dict[str, Any], index: int) -> dict[str, float]:
    """One round of a run from its cumulative marks: wall seconds, and per phase bytes and seconds."""
    marks: list[dict[str, Any]] = run["traffic_by_round"]
    start: dict[str, Any] = {"end_s": 0.0, "traffic": {}}
    end, before = marks[index], (marks[index - 1] if index else start)

    def delta(kind: str, key: str) -> float:
        return float(end["traffic"].get(kind, {}).get(key, 0)) - float(before["traffic"].get(kind, {}).get(key, 0))

    return {
        "round_s": end["end_s"] - before["end_s"],
        "train_s": delta("train", "seconds"),
        "train_bytes_sent": delta("train", "bytes_sent"),
        "train_bytes_received": delta("train", "bytes_received"),
        "train_messages": delta("train", "messages_sent"),
        "query_s": delta("query", "seconds"),
        "evaluate_s": delta("evaluate", "seconds"),
        "evaluate_bytes_sent": delta("evaluate", "bytes_sent"),
    }


KEYS = ("round_s", "train_s", "train_bytes_sent", "train_bytes_received", "train_messages", "query_s", "evaluate_s")


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per mode and round index: median, min and max over the repeats; then secagg / plain of the medians."""
    out: dict[str, Any] = {}
    for mode in ("plain", "secagg"):
        mine = [r for r in runs if r["mode"] == mode and r["status"] == "finished"]
        if not mine:
            continue
        per_round: dict[str, Any] = {}
        for index in range(min(len(r["traffic_by_round"]) for r in mine)):
            phases = [round_phases(r, index) for r in mine]
            per_round[f"round_{index + 1}"] = {k: _stats([p[k] for p in phases]) for k in KEYS}
        out[mode] = {"runs": len(mine), "run_wall_s": _stats([r["wall_s"] for r in mine]), **per_round}
    if "plain" in out and "secagg" in out:
        ratios: dict[str, Any] = {}
        for name, plain in out["plain"].items():
            if name.startswith("round_") and name in out["secagg"]:
                secure = out["secagg"][name]
                ratios[name] = {k: secure[k]["median"] / plain[k]["median"] for k in KEYS if plain[k]["median"]}
        ratios["run_wall_s"] = out["secagg"]["run_wall_s"]["median"] / out["plain"]["run_wall_s"]["median"]
        out["ratio_secagg_over_plain"] = ratios
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="a scratch directory for the consortium")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--n-train", type=int, default=64, help="training records per site")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per run (round 2 sends a global adapter)")
    parser.add_argument("--ffa-lora", action="store_true")
    parser.add_argument("--result", type=Path, default=Path("bench/results/secagg_cpu_2026-12-06.json"))
    args = parser.parse_args()
    result: dict[str, Any] = {
        "bench": "secagg",
        "date": "2026-12-06",
        "card": "CPU (no accelerator)",
        "machine": machine("cpu"),
        "versions": versions("flwr", "torch", "numpy"),
        "setup": {"sites": 3, "rounds_per_run": args.rounds, "n_train": args.n_train, "ffa_lora": args.ffa_lora},
        "fixed_point": fixed_point_error(),
    }
    measured = run_bench(args.out, repeats=args.repeats, rounds=args.rounds, ffa=args.ffa_lora, n_train=args.n_train)
    result["runs"] = measured["runs"]
    result["summary"] = summarise(measured["runs"])
    args.result.parent.mkdir(parents=True, exist_ok=True)
    args.result.write_text(json.dumps(result, indent=2))
    print(json.dumps({"summary": result["summary"], "fixed_point": result["fixed_point"]}, indent=2))


if __name__ == "__main__":
    main()
