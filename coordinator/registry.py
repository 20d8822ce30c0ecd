"""Versioned store of global adapters with their sha256 and lineage.

Each version is a directory `<root>/<version>/` holding `adapter.safetensors` and
`manifest.json`; it is written to a temporary directory and renamed into place, so a crash
never leaves a half-written version behind. Numbers are allocated under a lock and the rename
never replaces a published version: a number is never given twice, even to two writers at once.
Nor one the sites already hold: a registry restored from a backup older than the last round knows
fewer versions than the sites installed, so the strategy tells it the highest version any site
reports (`reserve_past`) and the next number comes after that one.

For `fedseek run --resume`, the registry also keeps, per run, the last round that started
(`runs/<run>.started`, written before any site is charged for it): a resumed run starts after it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from federation.errors import Conflict
from federation.ops.atomic import write_atomic
from federation.protocol import wire
from federation.protocol.names import InvalidNameError, check_adapter_name, check_name
from federation.protocol.versions import GLOBAL_VERSION_RE, global_version, version_number


class RegistryError(Conflict):
    """A missing or corrupt adapter version."""


def check_version(version: object) -> str:
    """`version` if it can name a registry entry (`global-vNNNN`, which also fits the one version
    pattern of federation.protocol.names); InvalidNameError otherwise, before any path is built."""
    checked = check_adapter_name(version, what="registry version")
    if GLOBAL_VERSION_RE.fullmatch(checked) is None:
        raise InvalidNameError(f"invalid registry version {checked!r}: versions are named global-vNNNN")
    return checked


@dataclass(frozen=True)
class SiteLineage:
    site: str
    epsilon: float
    delta: float
    num_examples: int
    steps: int
    noise_multiplier: float


@dataclass(frozen=True)
class Manifest:
    version: str
    sha256: str
    parent: str | None
    run: str
    round: int
    created_at: str
    sites: list[SiteLineage] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        sites = [SiteLineage(**s) for s in data.get("sites", [])]
        return cls(**{**data, "sites": sites})


class AdapterRegistry:
    """The coordinator's adapter versions, newest last."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self._held_elsewhere = 0  # the highest version number sites reported holding (`reserve_past`)

    def versions(self) -> list[str]:
        found = {p.name: version_number(p.name) for p in self.root.iterdir() if p.is_dir()}
        return sorted((v for v, n in found.items() if n is not None), key=lambda v: found[v] or 0)

    def latest(self) -> str | None:
        versions = self.versions()
        return versions[-1] if versions else None

    def reserve_past(self, version: str) -> None:
        """Number the versions this registry saves from now on past `version`, which sites hold already.

        A registry restored from a backup older than the last round does not know the versions made
        after the backup; the sites installed them, so reusing their numbers would name other weights
        (each site refuses that deploy: `VersionReused`). Kept in memory: every round asks the sites
        again before it saves (coordinator/strategy.py), and once saved the number is the registry's own.
        """
        held = version_number(check_version(version)) or 0  # InvalidNameError unless global-vNNNN
        self._held_elsewhere = max(self._held_elsewhere, held)

    def _next_version(self) -> str:
        mine = version_number(self.latest()) or 0  # 0: no version yet
        return global_version(max(mine, self._held_elsewhere) + 1)

    @contextlib.contextmanager
    def _allocating(self) -> Iterator[None]:
        """Held while a version number is chosen and published (`flock`: two coordinator processes on
        one registry, a crashed run's ServerApp and its resume, never take the same number)."""
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)  # the directory itself: no lock file beside versions
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def save(
        self, arrays: wire.Arrays, *, run: str, round: int, sites: list[SiteLineage], parent: str | None
    ) -> Manifest:
        payload = wire.encode(arrays)
        with self._allocating():
            for _ in range(100):  # a number published by a writer without the lock (an older coordinator): the next
                manifest = self._publish(payload, arrays, run=run, round=round, sites=sites, parent=parent)
                if manifest is not None:
                    return manifest
        raise RegistryError(f"no free version number in {self.root} after 100 tries")

    def _publish(
        self,
        payload: bytes,
        arrays: wire.Arrays,
        *,
        run: str,
        round: int,
        sites: list[SiteLineage],
        parent: str | None,
    ) -> Manifest | None:
        """Publish under the next free number; None if another writer took that number meanwhile."""
        version = self._next_version()
        manifest = Manifest(
            version=version,
            sha256=wire.sha256_of(arrays),
            parent=parent,
            run=run,
            round=round,
            created_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            sites=sites,
        )
        tmp = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=self.root))
        try:
            (tmp / "adapter.safetensors").write_bytes(payload)
            (tmp / "manifest.json").write_text(json.dumps(manifest.to_json(), indent=2))
            for name in ("adapter.safetensors", "manifest.json"):
                with open(tmp / name, "rb") as fh:
                    os.fsync(fh.fileno())
            # Not federation.ops.atomic.install_dir: that swaps out an existing directory, whereas this
            # rename fails (ENOTEMPTY) if the version was already published, so none is ever overwritten.
            os.replace(tmp, self.root / version)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                return None
            raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return manifest

    # ---- runs: what `fedseek run --resume` continues from ----------------------------------------
    def _started_path(self, run: str) -> Path:
        return self.root / "runs" / f"{check_name(run, what='run name')}.started"

    def round_started(self, run: str, round: int) -> None:
        """Record that `run`'s round `round` is about to be sent to sites (before any is charged for it)."""
        path = self._started_path(run)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps({"run": run, "round": max(round, self.last_started(run))}))

    def last_started(self, run: str) -> int:
        """The last round of `run` sent to sites (0: none)."""
        try:
            return int(json.loads(self._started_path(run).read_text())["round"])
        except FileNotFoundError:
            return 0
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise RegistryError(f"run {run!r}: unreadable round record {self._started_path(run)}: {exc}") from exc

    def run_versions(self, run: str) -> list[Manifest]:
        """The versions `run` made, oldest first (over every submission of it)."""
        return [m for m in (self.manifest(v) for v in self.versions()) if m.run == run]

    def manifest(self, version: str) -> Manifest:
        path = self.root / check_version(version) / "manifest.json"
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict):
                raise TypeError("manifest is not a JSON object")
            return Manifest.from_json(data)
        except (OSError, ValueError, TypeError) as exc:
            raise RegistryError(f"adapter version {version!r} has no readable manifest: {exc}") from exc

    def path(self, version: str) -> Path:
        return self.root / check_version(version) / "adapter.safetensors"

    def load(self, version: str) -> tuple[wire.Arrays, Manifest]:
        """Load and integrity-check a version against its recorded sha256."""
        manifest = self.manifest(version)
        try:
            arrays = wire.decode(self.path(version).read_bytes())
        except (OSError, wire.WireError) as exc:
            raise RegistryError(f"adapter version {version!r} is unreadable: {exc}") from exc
        if wire.sha256_of(arrays) != manifest.sha256:
            raise RegistryError(f"adapter version {version!r} fails its sha256 check")
        return arrays, manifest
