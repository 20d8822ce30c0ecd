"""`fedseek run`: submit the FedSeek Flower App to the running coordinator and follow it.

The run is submitted with `flwr run`, run inside the SuperLink's network namespace (the only
place its Control API exists: `coordinator.service.flwr_control`); progress is read from the
summary the ServerApp writes after every round.

`fedseek run --resume RUN` (`resume_plan`) continues a run whose coordinator crashed: a new
Flower run with the run's recorded settings, from the run's last registry version, starting at
the round after the last one that was sent to sites (`AdapterRegistry.last_started`, recorded
before any site is charged), under the run's `run-key`: each site's ledger names the run by it,
and a site refuses to be charged twice for one (run, round) (node.service). `--parent VERSION`
starts a new run from any registry version. Version numbers come from the registry, which never
gives one twice.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import federation.protocol
from coordinator.registry import AdapterRegistry, check_version
from coordinator.service import CONNECTION, CoordinatorError, flwr_control
from federation.errors import Conflict, NotFound
from federation.ops.layout import CoordinatorLayout
from federation.protocol.names import check_name
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


@dataclass(frozen=True)
class Continuation:
    """Where a submission starts within its run: none of this for a new run from the seeded init."""

    parent: str = ""
    """The registry version the submission starts from ("": the seeded init)."""
    start_round: int = 1
    run_key: str = ""
    """The run's name in the sites' ledgers ("": this submission's Flower run id, a new run)."""


def resume_plan(state_dir: Path, run_name: str, *, more_rounds: int | None = None) -> tuple[RunSettings, Continuation]:
    """What `fedseek run --resume RUN` submits: the run's recorded settings, from its last version, at
    the round after the last one sent to sites. `more_rounds`: that many rounds more than were
    started (default: the rest of the planned rounds). NotFound for an unknown run; Conflict when
    nothing is left to run."""
    check_name(run_name, what="run name")
    info = coordinator_info(state_dir)
    registry = AdapterRegistry(Path(info["registry"]))
    path = registry.root / "runs" / f"{run_name}.json"
    try:
        summary: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise NotFound(f"no run {run_name!r} in {registry.root / 'runs'}: nothing to resume") from exc
    except (OSError, ValueError) as exc:
        raise CoordinatorError(f"run {run_name}: unreadable summary {path}: {exc}") from exc
    if not summary.get("run_key") or not isinstance(summary.get("settings"), dict):
        raise Conflict(f"run {run_name} was made before runs could be resumed; start a new run with --parent")
    settings = RunSettings.from_items(summary["settings"])
    rounds = [int(r["round"]) for r in summary.get("rounds", [])]
    started = max([registry.last_started(run_name), *rounds], default=0)
    total = started + more_rounds if more_rounds is not None else settings.num_rounds
    if started >= total:
        raise Conflict(
            f"run {run_name}: all {settings.num_rounds} planned rounds were started; add --rounds N to train N more"
        )
    made = registry.run_versions(run_name)
    first = (summary.get("submissions") or [{}])[0].get("parent") or ""
    parent = made[-1].version if made else first
    return replace(settings, num_rounds=total), Continuation(parent, started + 1, str(summary["run_key"]))


def stop_earlier(state_dir: Path, run_name: str) -> None:
    """Stop the run's earlier Flower runs at the SuperLink (a crashed ServerApp leaves its run
    "running"; a live one must not train alongside its resume). Already finished ones are left."""
    info = coordinator_info(state_dir)
    path = Path(info["registry"]) / "runs" / f"{run_name}.json"
    try:
        submissions = json.loads(path.read_text()).get("submissions", [])
    except (OSError, ValueError):
        return
    for sub in submissions:
        run_id = str(sub.get("flower_run_id", ""))
        if run_id.isdigit():
            flwr_control(
                Path(info["superlink_socket"]),
                Path(info["flwr_home"]),
                ["stop", run_id, CONNECTION, "--format", "json"],
                timeout=60,
            )  # a finished run answers with an error: nothing to stop


def submit_run(
    state_dir: Path,
    *,
    settings: RunSettings,
    app_dir: Path | None = None,
    continuation: Continuation | None = None,
) -> str:
    """Submit a run with `settings` of the signed app (`signed_app`) to the coordinator in `state_dir`;
    return Flower's run id.

    The run config goes to `flwr run` as a TOML file: any run name or registry path survives
    quoting, and the SuperLink refuses a key the app does not declare.
    """
    app = signed_app(state_dir, app_dir)
    info = coordinator_info(state_dir)
    cont = continuation or Continuation()
    if cont.parent:
        check_version(cont.parent)
        AdapterRegistry(Path(info["registry"])).load(cont.parent)  # there and whole, before anything is sent
    config = RunConfig(
        settings,
        registry_dir=str(info["registry"]),
        parent_version=cont.parent,
        start_round=cont.start_round,
        run_key=cont.run_key,
    )
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


def wait_run(
    state_dir: Path, *, run_name: str, timeout: float, progress: Progress | None = None, since: int = 1
) -> dict[str, Any]:
    """Poll the run summary until it finishes; report each newly completed round (from round `since`:
    a resumed run's summary holds the earlier submissions' rounds, and its own status from its start)."""
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
        if since > 1 and not any(s.get("start_round") == since for s in summary.get("submissions", [])):
            time.sleep(1.0)  # still the crashed submission's summary: this one has not started yet
            continue
        rounds = [r for r in summary.get("rounds", []) if r.get("round", since) >= since]
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
    continuation: Continuation | None = None,
) -> dict[str, Any]:
    if continuation is not None and continuation.run_key:  # a resume: the run's earlier submissions stop first
        stop_earlier(state_dir, settings.run_name)
    submit_run(state_dir, settings=settings, app_dir=app_dir, continuation=continuation)
    return wait_run(
        state_dir,
        run_name=settings.run_name,
        timeout=timeout,
        progress=progress,
        since=continuation.start_round if continuation is not None else 1,
    )
