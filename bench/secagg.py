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


def run_bench(out: Path, *, repeats: int, ffa: bool, n_train: int) -> dict[str, Any]:
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
                    run_name=f"bench-{mode}-{i}", num_rounds=1, min_nodes=3, ffa_lora=ffa, secagg=secagg
                )
                start = time.monotonic()
                summary = run(coord_state, settings=settings, timeout=1800)
                wall = time.monotonic() - start
                rec = summary["rounds"][0]
                traffic = summary["traffic"]
                runs.append(
                    {
                        "mode": mode,
                        "repeat": i,
                        "status": summary["status"],
                        "wall_s": wall,
                        "accepted": rec["accepted"],
                        "traffic": traffic,
                        "secagg": rec.get("secagg", {}),
                    }
                )
                print(json.dumps({k: runs[-1][k] for k in ("mode", "repeat", "status", "wall_s")}), flush=True)
    finally:
        stop_all(procs)
    return {"runs": runs}


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mode in ("plain", "secagg"):
        mine = [r for r in runs if r["mode"] == mode and r["status"] == "finished"]
        if not mine:
            continue
        train = [r["traffic"]["train"] for r in mine]
        out[mode] = {
            "runs": len(mine),
            "wall_s": _stats([r["wall_s"] for r in mine]),
            "train_phase_s": _stats([t["seconds"] for t in train]),
            "train_bytes_sent": _stats([float(t["bytes_sent"]) for t in train]),
            "train_bytes_received": _stats([float(t["bytes_received"]) for t in train]),
            "train_messages": _stats([float(t["messages_sent"]) for t in train]),
            "query_s": _stats([r["traffic"].get("query", {}).get("seconds", 0.0) for r in mine]),
            "evaluate_s": _stats([r["traffic"].get("evaluate", {}).get("seconds", 0.0) for r in mine]),
        }
    if "plain" in out and "secagg" in out:
        p, s = out["plain"], out["secagg"]
        out["ratio_secagg_over_plain"] = {
            key: s[key]["median"] / p[key]["median"]
            for key in ("wall_s", "train_phase_s", "train_bytes_sent", "train_bytes_received")
            if p[key]["median"]
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="a scratch directory for the consortium")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--n-train", type=int, default=64, help="training records per site")
    parser.add_argument("--ffa-lora", action="store_true")
    parser.add_argument("--result", type=Path, default=Path("bench/results/secagg_cpu_2026-12-06.json"))
    args = parser.parse_args()
    result: dict[str, Any] = {
        "bench": "secagg",
        "date": "2026-12-06",
        "card": "CPU (no accelerator)",
        "machine": machine("cpu"),
        "versions": versions("flwr", "torch", "numpy"),
        "setup": {"sites": 3, "rounds_per_run": 1, "n_train": args.n_train, "ffa_lora": args.ffa_lora},
        "fixed_point": fixed_point_error(),
    }
    measured = run_bench(args.out, repeats=args.repeats, ffa=args.ffa_lora, n_train=args.n_train)
    result["runs"] = measured["runs"]
    result["summary"] = summarise(measured["runs"])
    args.result.parent.mkdir(parents=True, exist_ok=True)
    args.result.write_text(json.dumps(result, indent=2))
    print(json.dumps({"summary": result["summary"], "fixed_point": result["fixed_point"]}, indent=2))


if __name__ == "__main__":
    main()
