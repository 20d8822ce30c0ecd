"""How the agent starts its app guard, and the secret only the guard and the SuperNode share."""

from __future__ import annotations

import secrets
import sys
from pathlib import Path

from federation.ops.atomic import write_atomic
from federation.ops.layout import NodeLayout
from federation.ops.supervise import Managed

__all__ = ["guard_process", "write_superexec_secret"]


def write_superexec_secret(path: Path) -> None:
    """A new SuperExec secret (0600): without it, another local user's AcquireTask on the SuperNode's
    Runtime API is refused (401), so no one but the guard receives a task and its token."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, secrets.token_hex(32).encode("ascii"), mode=0o600)  # read as exact bytes


def guard_process(layout: NodeLayout, *, runtime_api: str, publishers: Path) -> Managed:
    """The guard for the SuperNode whose Runtime API is `runtime_api` (plain HTTP on loopback, as
    Flower's own SuperExec uses it); it appends its verdicts to the site's audit trail."""
    return Managed(
        name="app-guard",
        argv=[
            sys.executable,
            "-m",
            "node.app_guard.superexec",
            "--runtime-api-address",
            runtime_api,
            "--superexec-auth-secret-file",
            str(layout.superexec_secret),
            "--publishers",
            str(publishers),
            "--audit",
            str(layout.audit),
        ],
        log_path=layout.app_guard_log,
        env={"FLWR_HOME": str(layout.app_guard_home), "FLWR_DISABLE_UPDATE_CHECK": "1"},
    )
