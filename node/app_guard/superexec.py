"""`python -m node.app_guard.superexec`: the site's SuperExec, which runs only consortium-signed ClientApps.

Flower's own `run_superexec` loop (AcquireTask signed with the SuperExec secret, its plugin,
signal handling) with its executor replaced by `GuardExecutor`:

- a ClientApp task runs in `node.app_guard.verified_clientapp`, which checks the bundle's
  signature before unpacking it; the task token reaches it on stdin (not argv, which `ps`
  shows), its verdict comes back on an inherited pipe, and this process, the one writer of
  verdicts, appends `clientapp.approved` / `clientapp.refused` to the site's audit trail. An
  approved app starts only once its record is written (the guard acknowledges on stdin);
- every other task type is refused before anything starts (`task.refused`, task failed);
- each task unpacks its bundle into an empty FLWR_HOME of its own, removed when it ends, so no
  app directory is ever reused by a later task.

`run_superexec` takes no executor argument: the module-level `get_executor` it calls is
replaced, and start-up is refused if Flower stops looking its executor up there, or stops
unpacking bundles through the name `verified_clientapp` hooks (fail closed on an upgrade).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

from federation.errors import FedSeekError
from federation.security.app_signing import load_publishers
from privacy.audit import AuditTrail

log = logging.getLogger("fedseek.app_guard")

ACTOR = "app-guard"
_VERDICT_CHARS = 4096
_FIELD_CHARS = 300
_TASKS = "tasks"


def seam_problem(superexec: ModuleType, clientapp: ModuleType) -> str | None:
    """Why the guard cannot hook this Flower version, or None: both names must be what Flower calls."""
    if "get_executor" not in superexec.run_superexec.__code__.co_names or not hasattr(superexec, "get_executor"):
        return "flwr's run_superexec no longer takes its executor from get_executor"
    if "install_from_fab" not in clientapp.run_clientapp.__code__.co_names or not hasattr(
        clientapp, "install_from_fab"
    ):
        return "flwr's run_clientapp no longer unpacks app bundles through install_from_fab"
    return None


class GuardExecutor:
    """`flwr.supercore.superexec.executor.Executor`: launches verified ClientApps, refuses the rest."""

    def __init__(self, *, publishers: Path, audit: AuditTrail, home: Path) -> None:
        self._publishers = publishers
        self._audit = audit
        self._tasks = home / _TASKS
        self._children: list[subprocess.Popen[bytes]] = []
        self._lock = threading.Lock()

    # ---- the Executor protocol ------------------------------------------------------------------
    def get_eligible_capacity(
        self, supported_task_types: set[Any], *, insecure: bool = False, root_certificates_path: str | None = None
    ) -> tuple[set[Any], set[str]]:
        return set(supported_task_types), set()  # take every task, so that each refusal is audited

    def wait_for_capacity(self, task_type: Any = None, **_: Any) -> None:
        return None

    def reconcile(self) -> None:
        with self._lock:
            self._children = [c for c in self._children if c.poll() is None]

    def close(self) -> None:
        with self._lock:
            for child in self._children:
                if child.poll() is None:
                    child.terminate()

    def launch(self, spec: Any) -> Any:
        from flwr.supercore.constant import TaskType
        from flwr.supercore.superexec.executor import LaunchResult

        if spec.task_type != TaskType.CLIENT_APP:
            reason = f"task type {spec.task_type} is not run at this site"
            self._record("task.refused", spec, {"reason": reason})
            _finish_failed(spec, reason)
            return LaunchResult.failed(reason)
        try:
            self._start(spec)
        except OSError as exc:
            self._record("clientapp.failed", spec, {"reason": f"cannot start the task process: {exc.strerror}"})
            return LaunchResult.failed(f"cannot start the task process: {exc}")
        return LaunchResult.accepted()

    # ---- one ClientApp task -----------------------------------------------------------------------
    def _start(self, spec: Any) -> None:
        home = self._tasks / str(spec.task_id)
        shutil.rmtree(home, ignore_errors=True)
        home.mkdir(mode=0o700, parents=True)
        argv = [
            sys.executable,
            "-m",
            "node.app_guard.verified_clientapp",
            "--runtime-api-address",
            spec.runtime_api_address,
            "--publishers",
            str(self._publishers),
        ]
        if spec.insecure:
            argv.append("--insecure")
        elif spec.root_certificates_path:
            argv += ["--root-certificates", spec.root_certificates_path]
        if spec.parent_pid is not None:
            argv += ["--parent-pid", str(spec.parent_pid)]
        read_fd, write_fd = os.pipe()
        try:
            child = subprocess.Popen(
                [*argv, "--verdict-fd", str(write_fd)],
                stdin=subprocess.PIPE,
                pass_fds=(write_fd,),
                env={**os.environ, "FLWR_HOME": str(home)},
            )
        except OSError:
            os.close(read_fd)
            shutil.rmtree(home, ignore_errors=True)
            raise
        finally:
            os.close(write_fd)
        assert child.stdin is not None
        with contextlib.suppress(OSError):  # a task that died at once is recorded by _follow
            child.stdin.write(spec.token.encode() + b"\n")
            child.stdin.flush()
        with self._lock:
            self._children.append(child)
        threading.Thread(target=self._follow, args=(child, read_fd, spec, home), daemon=True).start()

    def _follow(self, child: subprocess.Popen[bytes], read_fd: int, spec: Any, home: Path) -> None:
        """Record the task's verdict, acknowledge an approval once it is written, clean up at its end."""
        assert child.stdin is not None
        try:
            with os.fdopen(read_fd, "r", encoding="utf-8", errors="replace") as pipe:
                line = pipe.readline(_VERDICT_CHARS)  # "" if the task died before deciding
            verdict = _parse_verdict(line)
            if verdict is None:
                code = child.wait()
                reason = f"task exited ({code}) before its bundle was checked"
                self._record("clientapp.failed", spec, {"reason": reason})
                return
            action, details = verdict
            try:
                self._record(action, spec, details)
            except FedSeekError as exc:  # unrecorded: the app must not run (the task sees no acknowledgement)
                log.error("app guard: task %s: cannot record %s: %s", spec.task_id, action, exc.one_line())
                return
            if action == "clientapp.approved":
                child.stdin.write(b"recorded\n")
        except (OSError, FedSeekError) as exc:
            log.error("app guard: task %s: %s", spec.task_id, exc)
        finally:
            with contextlib.suppress(OSError):
                child.stdin.close()
            child.wait()
            shutil.rmtree(home, ignore_errors=True)

    def _record(self, action: str, spec: Any, details: dict[str, Any]) -> None:
        details = {**details, "task_id": spec.task_id}
        if spec.fab_hash and "fab_sha256" not in details:  # what the SuperNode says, where the task could not
            details["fab_sha256"] = spec.fab_hash
        self._audit.append(actor=ACTOR, action=action, resource=f"task/{spec.task_id}", details=details)
        if "reason" in details:
            log.warning("app guard: %s task %s: %s", action, spec.task_id, details["reason"])


def _parse_verdict(line: str) -> tuple[str, dict[str, Any]] | None:
    """A task's verdict line as (audit action, details); None if it is missing or malformed."""
    try:
        data = json.loads(line)
    except ValueError:
        return None
    if not isinstance(data, dict) or data.get("verdict") not in ("approved", "refused"):
        return None
    action = f"clientapp.{data.pop('verdict')}"
    details = {
        str(k)[:64]: (v[:_FIELD_CHARS] if isinstance(v, str) else v)
        for k, v in data.items()
        if isinstance(v, str) or (isinstance(v, int) and not isinstance(v, bool))
    }
    return action, details


def _finish_failed(spec: Any, reason: str) -> None:
    """End a refused task at the SuperNode at once, so the run is not left waiting for it."""
    from flwr.proto.runtime_pb2 import PushTaskOutputRequest  # pylint: disable=E0611
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supercore.tls import validate_and_resolve_root_certificates

    client = RuntimeHttpClient.from_server_address(
        server_address=spec.runtime_api_address,
        insecure=spec.insecure,
        root_certificates=validate_and_resolve_root_certificates(spec.root_certificates_path, spec.insecure),
        interceptors=[
            RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
            RuntimeTokenHttpInterceptor(spec.token),
        ],
    )
    try:
        client.PushTaskOutput(PushTaskOutputRequest(sub_status="failed", details=reason))
    except Exception as exc:  # the refusal stands; the task then expires on its own
        log.error("app guard: could not end refused task %s: %s", spec.task_id, exc)
    finally:
        client.close()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m node.app_guard.superexec", description=__doc__.splitlines()[0])
    p.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API (loopback, plain HTTP)")
    p.add_argument("--superexec-auth-secret-file", required=True, type=Path)
    p.add_argument("--publishers", required=True, type=Path, help="the app-publisher keys this site trusts")
    p.add_argument("--audit", required=True, type=Path, help="the site's audit trail")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from flwr.supercore.auth import load_superexec_auth_secret
    from flwr.supercore.constant import ExecutorType
    from flwr.supercore.superexec import run_superexec as superexec
    from flwr.supercore.utils import get_flwr_home
    from flwr.supernode.runtime import run_clientapp as clientapp

    try:
        trusted = load_publishers(args.publishers)  # an unusable trust file stops the guard, not each task
        secret = load_superexec_auth_secret(str(args.superexec_auth_secret_file))
    except (FedSeekError, ValueError) as exc:
        print(f"app guard: {exc}", file=sys.stderr)
        return 2
    problem = seam_problem(superexec, clientapp)
    if problem is not None:
        print(f"app guard: {problem}; refusing to start", file=sys.stderr)
        return 2
    home = get_flwr_home()
    for leftover in (home / _TASKS, home / "apps"):  # a crash may have left unpacked bundles
        shutil.rmtree(leftover, ignore_errors=True)
    audit = AuditTrail(args.audit)
    executor = GuardExecutor(publishers=args.publishers.resolve(), audit=audit, home=home)
    superexec.get_executor = lambda *_, **__: executor  # type: ignore[attr-defined]
    audit.append(
        actor=ACTOR,
        action="app_guard.started",
        resource=args.runtime_api_address,
        details={"publishers": sorted(trusted)},
    )
    superexec.run_superexec(
        runtime_api_address=args.runtime_api_address,
        insecure=True,  # the SuperNode's Runtime API is plain HTTP on loopback; AcquireTask needs the secret
        superexec_auth_secret=secret,
        runtime_dependency_install=False,  # never install what a bundle asks for
        executor_type=ExecutorType.SUBPROCESS,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
