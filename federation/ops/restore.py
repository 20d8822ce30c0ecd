"""`fedseek restore`: a backup checked whole, then renamed into place; refused, naming the file, otherwise.

Before anything is written where it matters: the manifest's signature (against `ca` when given; a
backup without one is then refused), every file's size and sha256 (a mismatch, a missing, extra or
duplicate member, a link or device, a truncated archive: refused, naming the file), SQLite's
integrity check; a non-empty destination is refused unless `force`, and one a live party runs on,
always. Files are unpacked into a temporary directory beside the destination and renamed into place;
with `force` the old directory is kept beside it (`<dir>.replaced-<time>`), never deleted.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import sqlite3
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from federation.ops.atomic import fsync_dir
from federation.ops.backup_format import (
    CHUNK,
    LAYOUTS,
    MANIFEST,
    MAX_MANIFEST,
    BackupError,
    PartyKind,
    StateInUse,
    check_manifest,
    verify_manifest,
)

__all__ = ["RestoreReport", "read_manifest", "restore"]


@dataclass
class RestoreReport:
    state: Path
    pki: Path | None
    kind: PartyKind
    name: str
    created_at: str
    files: int
    manifest_sha256: str
    signed_by: str | None
    replaced: list[Path] = field(default_factory=list)
    seconds: float = 0.0


def _running_pid(state: Path, kind: PartyKind) -> int | None:
    """The pid a live party wrote into `state`'s endpoints file, or None."""
    path = LAYOUTS[kind](state).endpoints
    try:
        pid = int(json.loads(path.read_text())["pid"])
        os.kill(pid, 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return pid


class _Source:
    """A backup to read: a directory or a tar archive; members in any order, each read once."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._tar: tarfile.TarFile | None = None

    def __enter__(self) -> _Source:
        if not self.path.exists():
            raise BackupError(f"no backup at {self.path}")
        if self.path.is_file():
            try:
                self._tar = tarfile.open(self.path, "r:*")
            except (tarfile.TarError, OSError, EOFError) as exc:
                raise BackupError(f"{self.path} is not a readable backup archive: {exc}") from None
        return self

    def __exit__(self, *exc: object) -> None:
        if self._tar is not None:
            self._tar.close()

    def manifest(self) -> bytes:
        if self._tar is None:
            try:
                with (self.path / MANIFEST).open("rb") as fh:
                    raw = fh.read(MAX_MANIFEST + 1)
            except OSError as exc:
                raise BackupError(f"the backup {self.path} has no readable {MANIFEST}: {exc.strerror}") from None
            if len(raw) > MAX_MANIFEST:
                raise BackupError(f"the backup's {MANIFEST} is not a plain file of at most 64 MiB")
            return raw
        try:
            member = self._tar.getmember(MANIFEST)
            stream = self._tar.extractfile(member) if member.isfile() and member.size <= MAX_MANIFEST else None
            if stream is None:
                raise BackupError(f"the backup's {MANIFEST} is not a plain file of at most 64 MiB")
            return stream.read()
        except KeyError:
            raise BackupError(f"the backup {self.path} has no {MANIFEST}") from None
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise BackupError(f"the backup archive {self.path} is damaged or truncated: {exc}") from None

    def members(self) -> Iterator[tuple[str, IO[bytes]]]:
        """(name, stream) of every file but the manifest; a link, device or directory entry is refused."""
        if self._tar is None:
            for path in _walk_all(self.path):
                name = path.relative_to(self.path).as_posix()
                if name == MANIFEST:
                    continue
                if path.is_symlink() or not path.is_file():
                    raise BackupError(f"backup file {name}: not a plain file")
                with path.open("rb") as fh:
                    yield name, fh
            return
        try:
            for member in self._tar:
                if member.name == MANIFEST:
                    continue
                if not member.isfile():
                    raise BackupError(f"backup file {member.name}: not a plain file (link, device or directory)")
                stream = self._tar.extractfile(member)
                assert stream is not None
                yield member.name, stream
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise BackupError(f"the backup archive {self.path} is damaged or truncated: {exc}") from None


def _walk_all(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for f in sorted(filenames):
            yield Path(dirpath) / f
        for d in dirnames:
            if (Path(dirpath) / d).is_symlink():
                yield Path(dirpath) / d


def read_manifest(source: Path, *, ca: Path | None = None) -> tuple[dict[str, Any], str, str | None]:
    """The manifest of the backup at `source`, its sha256 and its checked signer (None: unsigned)."""
    with _Source(source) as src:
        raw = src.manifest()
    manifest = check_manifest(raw)
    return manifest, hashlib.sha256(raw).hexdigest(), verify_manifest(manifest, ca=ca)


def _check_destination(path: Path, *, kind: PartyKind | None, force: bool, what: str) -> bool:
    """Whether `path` holds anything (then it is replaced, only with `force`); refuses a live party's state."""
    if kind is not None and path.is_dir() and (pid := _running_pid(path, kind)) is not None:
        raise StateInUse(f"a {kind} is running on {path} (pid {pid}): stop it before restoring into it")
    if path.exists() and not path.is_dir():
        raise StateInUse(f"{what} {path} is not a directory")
    full = path.is_dir() and any(path.iterdir())
    if full and not force:
        raise StateInUse(
            f"{what} {path} is not empty: restore into a new directory, or pass --force (it is kept aside)"
        )
    return full


def restore(
    source: Path,
    state: Path,
    *,
    pki: Path | None = None,
    ca: Path | None = None,
    force: bool = False,
    check_only: bool = False,
) -> RestoreReport:
    """Check the backup at `source` whole and install it as `state` (and its PKI part as `pki`).

    Nothing is written at `state` or `pki` until every file is unpacked and matches the manifest."""
    started = time.monotonic()
    with _Source(source) as src:
        raw = src.manifest()
        manifest = check_manifest(raw)
        signer = verify_manifest(manifest, ca=ca)
        kind: PartyKind = manifest["party"]["kind"]
        has_pki = bool(manifest.get("pki"))
        if has_pki and pki is None and not check_only:
            raise BackupError("this backup holds the PKI directory too: give --pki DIR to restore it into")
        dests: dict[str, Path] = {"state": state}
        if has_pki and pki is not None:
            dests["pki"] = pki
        full = {
            root: _check_destination(dest, kind=kind if root == "state" else None, force=force, what=root)
            for root, dest in dests.items()
            if not check_only
        }
        staging_parent = state.parent if not check_only else Path(tempfile.gettempdir())
        staging_parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{state.name}.restore-", dir=staging_parent))
        try:
            expected = {f["path"]: f for f in manifest["files"]}
            done: set[str] = set()
            for name, stream in src.members():
                entry = expected.get(name)
                if entry is None:
                    raise BackupError(f"backup file {name}: not in the manifest (added after it was made)")
                if name in done:
                    raise BackupError(f"backup file {name}: present twice")
                _unpack(stream, work / name, entry)
                done.add(name)
            missing = sorted(set(expected) - done)
            if missing:
                raise BackupError(f"backup file {missing[0]}: missing (the backup is incomplete)")
            for entry in manifest["files"]:
                if entry.get("how") == "sqlite":
                    _check_sqlite(work / entry["path"], entry["path"])
            report = RestoreReport(
                state=state,
                pki=dests.get("pki"),
                kind=kind,
                name=str(manifest["party"].get("name", "")),
                created_at=str(manifest.get("created_at", "")),
                files=len(expected),
                manifest_sha256=hashlib.sha256(raw).hexdigest(),
                signed_by=signer,
            )
            if check_only:
                return report
            for root, dest in dests.items():
                staged = work / root
                staged.mkdir(mode=0o700, exist_ok=True)  # a state with nothing to restore is still a state
                report.replaced += _install(staged, dest, replace=full[root])
        finally:
            shutil.rmtree(work, ignore_errors=True)
    report.seconds = time.monotonic() - started
    return report


def _unpack(stream: IO[bytes], target: Path, entry: dict[str, Any]) -> None:
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    digest, size = hashlib.sha256(), 0
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        while chunk := stream.read(CHUNK):
            digest.update(chunk)
            out.write(chunk)
            size += len(chunk)
        out.flush()
        os.fsync(out.fileno())
    name = entry["path"]
    if size != entry["size"]:
        raise BackupError(f"backup file {name}: {size} bytes, the manifest says {entry['size']} (damaged or altered)")
    if digest.hexdigest() != entry["sha256"]:
        raise BackupError(f"backup file {name}: sha256 does not match the manifest (damaged or altered)")
    mode = int(entry.get("mode", 0o600)) & 0o755
    os.chmod(target, mode if entry.get("how") != "secret" else 0o600)


def _check_sqlite(path: Path, name: str) -> None:
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            ok = conn.execute("PRAGMA integrity_check").fetchone()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise BackupError(f"backup file {name}: not a usable SQLite database ({exc})") from None
    if not ok or ok[0] != "ok":
        raise BackupError(f"backup file {name}: fails SQLite's integrity check")


def _install(staged: Path, dest: Path, *, replace: bool) -> list[Path]:
    """Rename the checked `staged` directory into place as `dest`; an existing one (with --force) is kept aside."""
    for dirpath, _dirs, _files in os.walk(staged):
        os.chmod(dirpath, 0o700)
    dest.parent.mkdir(parents=True, exist_ok=True)
    moved: list[Path] = []
    if dest.exists():
        if replace:
            aside = dest.with_name(f"{dest.name}.replaced-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S%fZ')}")
            os.replace(dest, aside)
            moved.append(aside)
        else:
            dest.rmdir()  # empty (checked): the staged copy takes its place
    try:
        os.replace(staged, dest)  # same filesystem: staged beside dest's parent (pki may be elsewhere)
    except OSError as exc:
        if exc.errno != errno.EXDEV:  # another filesystem: copy beside dest, then rename there
            raise
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.restore-", dir=dest.parent))
        shutil.copytree(staged, tmp, dirs_exist_ok=True)
        os.replace(tmp, dest)
    fsync_dir(dest.parent)
    return moved
