"""What every benchmark records about where it ran, so results from different machines never mix."""

from __future__ import annotations

import platform
from importlib import metadata

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
