"""Global adapter version names, `global-vNNNN`: what the coordinator's registry numbers and every site installs.

Both sides read the number out of a name: the registry to choose the next one, a site to name in its
readiness answer the highest version it holds (`wire.Readiness.latest_version`). A coordinator restored
from a backup older than its last round knows fewer versions than its sites hold; numbering past the
sites' highest, it never gives a number the sites already hold with other weights.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["GLOBAL_VERSION_RE", "global_version", "highest_global_version", "version_number"]

GLOBAL_VERSION_RE = re.compile(r"global-v(\d{4,})")
"""Matched whole (`fullmatch`): no trailing newline slips through as `$` would let it."""


def global_version(number: int) -> str:
    """The name of global version `number` (at least 1)."""
    if number < 1:
        raise ValueError(f"global version numbers start at 1, not {number}")
    return f"global-v{number:04d}"


def version_number(version: object) -> int | None:
    """The number in a `global-vNNNN` name; None for anything else (a site's own adapter name, junk)."""
    match = GLOBAL_VERSION_RE.fullmatch(version) if isinstance(version, str) else None
    return int(match.group(1)) if match else None


def highest_global_version(versions: Iterable[str]) -> str | None:
    """The highest-numbered `global-vNNNN` among `versions` (by number, not by text); None if there is none."""
    numbered = [(n, v) for v in versions if (n := version_number(v)) is not None]
    return max(numbered)[1] if numbered else None
