"""The Flower ServerApp: federated DP-LoRA rounds, one global adapter version per round.

The SuperLink starts it for each `fedseek run`; its run config (see
federation/protocol/flower_app/pyproject.toml) says where the registry lives and how many rounds to run.
A summary of the run is written to `<registry>/runs/<run-name>.json` for operators and the demo.
Its status is `finished` only if every planned round made a global adapter; otherwise `failed`,
with an `error` naming the sites that dropped, declined or were charged for nothing.

A run resumed after a crash (`fedseek run --resume`, coordinator/runs.py) is a new Flower run that
starts at round `start-round` from `parent-version` under the same `run-key` (the sites' ledgers
name the run by it); its summary keeps the earlier submissions' rounds.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from coordinator.grid_meter import MeteredGrid
from coordinator.registry import AdapterRegistry
from coordinator.secagg import SecAggLoraFedAvg
from coordinator.strategy import LoraFedAvg, RunFailed
from coordinator.witness import LedgerWitness, WitnessStoreError, coordinator_witness
from federation.ops.atomic import write_atomic
from federation.protocol import records
from federation.protocol.round_settings import RoundSettingsError, RunConfig

log = logging.getLogger("fedseek.coordinator")

app = ServerApp()


def write_run_summary(path: Path, summary: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(summary, indent=2))


def _earlier(path: Path) -> dict[str, Any]:
    """The summary a resumed run continues (empty if there is none)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def run_federation(
    grid: Grid,
    run_config: Mapping[str, Any],
    *,
    witness: Callable[[Path], LedgerWitness] | None = None,
    flower_run_id: str = "",
) -> dict[str, Any]:
    """Run the configured rounds on `grid`; return the run summary (also used by tests).

    `run_config` is Flower's run config of the app: an unknown key or a wrong type is refused
    (RoundSettingsError) before anything runs, and absent keys take RunSettings' defaults.
    `witness(registry_dir)` gives the ledger witness every site's signed ledger head is held
    against (the ServerApp's: `coordinator_witness`); without it no ledger is witnessed.
    """
    config = RunConfig.from_run_config(run_config)
    if not config.registry_dir:
        raise RoundSettingsError("the run config names no registry-dir; submit runs with `fedseek run`")
    settings = config.settings
    registry = AdapterRegistry(Path(config.registry_dir))
    summary_path = registry.root / "runs" / f"{settings.run_name}.json"
    earlier = _earlier(summary_path) if config.start_round > 1 else {}
    earlier_rounds = [r for r in earlier.get("rounds", []) if r.get("round", 0) < config.start_round]
    run_key = config.run_key or flower_run_id
    summary: dict[str, Any] = {
        "run": settings.run_name,
        "status": "running",
        "rounds_planned": settings.num_rounds,
        "ffa_lora": settings.ffa_lora,
        "secagg": settings.secagg,
        "rounds": earlier_rounds,
        "run_key": run_key,  # the run's name in every site's ledger, over all its submissions
        "settings": settings.items(),  # what `fedseek run --resume` runs the rest of the run with
        "submissions": [
            *earlier.get("submissions", []),
            {
                "flower_run_id": flower_run_id,
                "start_round": config.start_round,
                "parent": config.parent_version or None,
            },
        ],
    }

    def snapshot() -> None:
        summary["rounds"] = earlier_rounds + [asdict(r) for r in strategy.rounds]
        summary["traffic"] = metered.summary()  # messages, bytes and seconds per message type (bench/secagg.py)
        while len(traffic_by_round) < len(strategy.rounds):  # cumulative, at the end of each round
            traffic_by_round.append({"end_s": time.monotonic() - started, "traffic": summary["traffic"]})
        summary["traffic_by_round"] = traffic_by_round
        summary["rounds_completed"] = sum(1 for r in summary["rounds"] if r["version"])
        latest = strategy.latest or (registry.manifest(config.parent_version) if config.parent_version else None)
        summary["global_adapter"] = latest.to_json() if latest else None
        if latest:
            summary["global_adapter"]["path"] = str(registry.path(latest.version))
        write_run_summary(summary_path, summary)

    try:
        ledger_witness = witness(registry.root) if witness is not None else None
    except WitnessStoreError as exc:  # no witness, no run: a site's reset ledger would go unseen
        summary.update(status="failed", error=f"run not started: {exc.one_line()}")
        write_run_summary(summary_path, summary)
        return summary
    metered = MeteredGrid(grid)
    traffic_by_round: list[dict[str, Any]] = []
    started = time.monotonic()
    strategy_class = SecAggLoraFedAvg if settings.secagg else LoraFedAvg  # --secagg: only the sum is seen
    strategy = strategy_class(
        registry=registry,
        settings=settings,
        on_round=snapshot,
        witness=ledger_witness,
        parent=config.parent_version or None,
        first_round=config.start_round,
        run_key=run_key,
    )
    num_rounds = settings.num_rounds - config.start_round + 1  # this submission's; the run's rounds are counted on
    start = strategy.global_arrays  # the parent version's, or none: sites start from the seeded LoRA init
    write_run_summary(summary_path, summary)
    try:
        strategy.start(  # each train message's config is the strategy's TrainInstruction for its round
            grid=metered,
            initial_arrays=records.to_array_record(start) if start is not None else ArrayRecord(),
            num_rounds=num_rounds,
            timeout=settings.round_timeout,
            evaluate_config=ConfigRecord({"run-name": settings.run_name}),
        )
        made = sum(1 for r in strategy.rounds if r.version)
        if made < num_rounds:  # belt and braces: the strategy raises RunFailed at such a round
            raise RunFailed(f"{made} of {num_rounds} rounds made a global adapter")
        summary["status"] = "finished"
    except RunFailed as exc:  # a run that made fewer adapters than planned failed: the error names the sites
        summary["status"] = "failed"
        summary["error"] = str(exc)
        log.error("run %s failed: %s", settings.run_name, exc)
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
    summary = run_federation(grid, context.run_config, witness=coordinator_witness, flower_run_id=str(context.run_id))
    if summary["status"] != "finished":  # Flower records the run as failed too
        raise RunFailed(summary["error"])
