"""Run a `fedseek` command as root without CAP_SYS_ADMIN (a locked-down container): no namespace may be made."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path


def fedseek_without_sys_admin(
    *args: str, config: Path, timeout: float, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`fedseek ARGS --config CONFIG` under `setpriv --bounding-set=-sys_admin`, output captured."""
    return subprocess.run(
        [
            "setpriv",
            "--bounding-set=-sys_admin",
            sys.executable,
            "-m",
            "federation.cli.main",
            *args,
            "--config",
            str(config),
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=None if env is None else dict(env),
    )
