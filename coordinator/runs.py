"""`fedseek run`: submit the FedSeek Flower App to the running coordinator and follow it.

The run is submitted with `flwr run` to the SuperLink's loopback Control API; progress is
read from the summary the ServerApp writes after every round.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import federation.protocol
from coordinator.service import CONNECTION, CoordinatorError, flwr_bin, flwr_env
from federation.ops.layout import CoordinatorLayout
from federation.protocol.round_settings import RunConfig, RunSettings

FAB_DIR = Path(federation.protocol.__file__).parent / "flower_app"

Progress = Callable[[dict[str, Any]], None]


def coordinator_info(state_dir: Path) -> dict[str, Any]:
    path = CoordinatorLayout(state_dir).endpoints
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CoordinatorError(f"no running coordinator found in {state_dir} ({path.name} unreadable)") from exc
    return data


def submit_run(state_dir: Path, *, settings: RunSettings) -> str:
    """Submit a run with `settings` to the coordinator in `state_dir`; return Flower's run id.

    The run config goes to `flwr run` as a TOML file: any run name or registry path survives
    quoting, and the SuperLink refuses a key the app does not declare.
    """
    info = coordinator_info(state_dir)
    config = RunConfig(settings, registry_dir=str(info["registry"]))
    with tempfile.TemporaryDirectory(prefix="fedseek-run-") as tmp:
        run_config = Path(tmp) / "run-config.toml"
        run_config.write_text(config.to_toml())
        out = subprocess.run(
            [flwr_bin("flwr"), "run", str(FAB_DIR), CONNECTION, "--run-config", str(run_config), "--format", "json"],
            env=flwr_env(Path(info["flwr_home"])),
            capture_output=True,
            text=True,
            timeout=120,
        )
    try:
        result = json.loads(out.stdout)
    except ValueError:
        result = {}
    if out.returncode != 0 or not result.get("success", False):
        raise CoordinatorError(f"flwr run failed: {(out.stdout + out.stderr).strip()[-400:]}")
    return str(result.get("run-id", result.get("run_id", "")))


def wait_run(state_dir: Path, *, run_name: str, timeout: float, progress: Progress | None = None) -> dict[str, Any]:
    """Poll the run summary until it finishes; report each newly completed round."""
    info = coordinator_info(state_dir)
    path = Path(info["registry"]) / "runs" / f"{run_name}.json"
    deadline = time.monotonic() + timeout
    seen = 0
    while time.monotonic() < deadline:
        try:
            summary: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError):
            time.sleep(1.0)
            continue
        rounds = summary.get("rounds", [])
        for rec in rounds[seen:]:
            if progress:
                progress(rec)
        seen = len(rounds)
        if summary.get("status") == "finished":
            return summary
        if summary.get("status") == "failed":
            raise CoordinatorError(f"run {run_name} failed: {summary.get('error')}")
        time.sleep(1.0)
    raise CoordinatorError(f"run {run_name} did not finish within {timeout:.0f}s")


def run(
    state_dir: Path, *, settings: RunSettings, timeout: float = 1800, progress: Progress | None = None
) -> dict[str, Any]:
    submit_run(state_dir, settings=settings)
    return wait_run(state_dir, run_name=settings.run_name, timeout=timeout, progress=progress)
