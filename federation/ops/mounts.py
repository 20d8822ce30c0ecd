"""Which filesystem a path is on: whether a file written there would be at rest on a disk.

Read from `/proc/self/mountinfo` (the mount namespace this process sees): the longest mount point
that holds the path's nearest existing ancestor. Linux only, like the rest of the node.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["RAM_FILESYSTEMS", "filesystem_type", "in_memory"]

RAM_FILESYSTEMS = frozenset({"tmpfs", "ramfs"})
"""Filesystems whose files live in memory only: gone at power-off, never on a disk (swap aside)."""

_MOUNTINFO = Path("/proc/self/mountinfo")


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash in paths as octal escapes (`\\040`)."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def filesystem_type(path: Path) -> str:
    """The type (`ext4`, `tmpfs`, `overlay`, ...) of the filesystem `path` is, or would be created, on."""
    here = Path(os.path.realpath(path))
    while not here.exists() and here != here.parent:
        here = here.parent
    best, kind = "", "unknown"
    for line in _MOUNTINFO.read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields = left.split()
        if len(fields) < 5 or not right:
            continue
        point = _unescape(fields[4])
        inside = str(here) == point or str(here).startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):  # a later mount over the same point hides the earlier one
            best, kind = point, right.split()[0]
    return kind


def in_memory(path: Path) -> bool:
    return filesystem_type(path) in RAM_FILESYSTEMS
