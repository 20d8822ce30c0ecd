"""`fedseek run`: submit the FedSeek Flower App to the running coordinator and follow it.

The run is submitted with `flwr run`, run inside the SuperLink's network namespace (the only
place its Control API exists: `coordinator.service.flwr_control`); progress is read from the
summary the ServerApp writes after every round.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import federation.protocol
from coordinator.service import CONNECTION, CoordinatorError, flwr_control
from federation.ops.layout import CoordinatorLayout
from federation.protocol.round_settings import RunConfig, RunSettings
from federation.security.app_signing import SIGNATURE_FILE

FAB_DIR = Path(federation.protocol.__file__).parent / "flower_app"

Progress = Callable[[dict[str, Any]], None]


def coordinator_info(state_dir: Path) -> dict[str, Any]:
    path = CoordinatorLayout(state_dir).endpoints
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CoordinatorError(f"no running coordinator found in {state_dir} ({path.name} unreadable)") from exc
    return data


def signed_app(state_dir: Path, app_dir: Path | None = None) -> Path:
    """The app directory to submit: `app_dir`, else the coordinator's own signed copy. Sites refuse
    a bundle without the consortium's app-publisher signature, so an unsigned one is refused here first."""
    app = app_dir if app_dir is not None else CoordinatorLayout(state_dir).signed_app
    if not (app / SIGNATURE_FILE).is_file():
        raise CoordinatorError(
            f"no signed app in {app}: sites run only app bundles the consortium signed "
            f"(`fedseek app sign --pki DIR --out {app}`)"
        )
    return app


def submit_run(state_dir: Path, *, settings: RunSettings, app_dir: Path | None = None) -> str:
    """Submit a run with `settings` of the signed app (`signed_app`) to the coordinator in `state_dir`;
    return Flower's run id.

    The run config goes to `flwr run` as a TOML file: any run name or registry path survives
    quoting, and the SuperLink refuses a key the app does not declare.
    """
    app = signed_app(state_dir, app_dir)
    info = coordinator_info(state_dir)
    config = RunConfig(settings, registry_dir=str(info["registry"]))
    with tempfile.TemporaryDirectory(prefix="fedseek-run-") as tmp:
        run_config = Path(tmp) / "run-config.toml"
        run_config.write_text(config.to_toml())
        out = flwr_control(
            Path(info["superlink_socket"]),
            Path(info["flwr_home"]),
            ["run", str(app), CONNECTION, "--run-config", str(run_config), "--format", "json"],
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
    state_dir: Path,
    *,
    settings: RunSettings,
    timeout: float = 1800,
    progress: Progress | None = None,
    app_dir: Path | None = None,
) -> dict[str, Any]:
    submit_run(state_dir, settings=settings, app_dir=app_dir)
    return wait_run(state_dir, run_name=settings.run_name, timeout=timeout, progress=progress)
