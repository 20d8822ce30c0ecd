"""The Flower ServerApp: federated DP-LoRA rounds, one global adapter version per round.

The SuperLink starts it for each `fedseek run`; its run config (see
federation/protocol/flower_app/pyproject.toml) says where the registry lives and how many rounds to run.
A summary of the run is written to `<registry>/runs/<run-name>.json` for operators and the demo.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from coordinator.registry import AdapterRegistry
from coordinator.strategy import LoraFedAvg

log = logging.getLogger("fedseek.coordinator")

app = ServerApp()


def write_run_summary(path: Path, summary: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, path)


def run_federation(grid: Grid, run_config: dict[str, Any]) -> dict[str, Any]:
    """Run the configured rounds on `grid`; return the run summary (also used by tests)."""
    registry = AdapterRegistry(Path(str(run_config["registry-dir"])))
    run_name = str(run_config.get("run-name", "run"))
    rounds = int(run_config.get("num-rounds", 2))
    ffa = bool(run_config.get("ffa-lora", False))  # FFA-LoRA: A frozen at the shared seeded init, B-only traffic
    summary_path = registry.root / "runs" / f"{run_name}.json"
    summary: dict[str, Any] = {
        "run": run_name,
        "status": "running",
        "rounds_planned": rounds,
        "ffa_lora": ffa,
        "rounds": [],
    }

    def snapshot() -> None:
        summary["rounds"] = [asdict(r) for r in strategy.rounds]
        summary["rounds_completed"] = sum(1 for r in strategy.rounds if r.version)
        summary["global_adapter"] = strategy.latest.to_json() if strategy.latest else None
        if strategy.latest:
            summary["global_adapter"]["path"] = str(registry.path(strategy.latest.version))
        write_run_summary(summary_path, summary)

    strategy = LoraFedAvg(
        registry=registry,
        run_name=run_name,
        min_nodes=int(run_config.get("min-nodes", 2)),
        on_round=snapshot,
        ffa=ffa,
    )
    train_config = ConfigRecord(
        {
            "run-name": run_name,
            "num-rounds": rounds,
            "local-epochs": int(run_config.get("local-epochs", 1)),
            "batch-size": int(run_config.get("batch-size", 8)),
            "learning-rate": float(run_config.get("learning-rate", 2e-3)),
            "max-grad-norm": float(run_config.get("max-grad-norm", 1.0)),
        }
    )
    write_run_summary(summary_path, summary)
    try:
        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(),  # empty: sites start from the seeded LoRA init
            num_rounds=rounds,
            timeout=float(run_config.get("round-timeout", 900.0)),
            train_config=train_config,
            evaluate_config=ConfigRecord({"run-name": run_name}),
        )
        summary["status"] = "finished"
    except Exception as exc:
        summary["status"] = "failed"
        summary["error"] = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        snapshot()
    return summary


@app.main()
def main(grid: Grid, context: Context) -> None:
    logging.basicConfig(level=logging.INFO)
    run_federation(grid, dict(context.run_config))
