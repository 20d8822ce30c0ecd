"""What every benchmark records about where it ran, so results from different machines never mix."""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import torch


def versions(*packages: str) -> dict[str, str | None]:
    """Python, the given packages' installed versions (None if absent) and the CUDA build."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    out["cuda"] = torch.version.cuda
    return out


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return str(torch.cuda.get_device_name(0))
    return f"{platform.machine()} CPU ({platform.processor() or platform.platform()})"


def write_results(res: dict[str, Any], out: Path, *, t0: float) -> None:
    """Stamp `res` with the date and the seconds since `t0`, and write it as JSON to `out` (each method's
    result is saved as it lands, so a run cut short keeps what it measured)."""
    res["date"] = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    res["total_seconds"] = round(time.perf_counter() - t0, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))


def call_seconds(fn: Callable[[], Any], device: str, repeats: int, *, warmup: int = 2) -> list[float]:
    """Seconds of each of `repeats` calls of `fn` after `warmup` untimed calls (device events on CUDA)."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end) / 1000)
        else:
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
    return out


Recorder = Callable[[str, Callable[[], dict[str, Any]]], None]


def recorder(
    res: dict[str, Any], *, t0: float, budget_s: float | None, log: Callable[[str], None], save: Callable[[], None]
) -> Recorder:
    """record(name, fn): res["methods"][name] = fn(), or {"skipped": ...} once `budget_s` since `t0` is
    spent, or {"error": ...} if fn raises (one broken method must not lose the others); then log and save."""

    def record(name: str, fn: Callable[[], dict[str, Any]]) -> None:
        if budget_s is not None and time.perf_counter() - t0 > budget_s:
            res["methods"][name] = {"skipped": f"time budget of {budget_s:.0f} s spent"}
        else:
            try:
                res["methods"][name] = fn()
            except Exception as exc:
                first = str(exc).splitlines()[0] if str(exc) else ""
                res["methods"][name] = {"error": f"{type(exc).__name__}: {first}"}
        log(f"{name}: { {k: v for k, v in res['methods'][name].items() if k != 'values'} }")
        save()

    return record
