"""`fedseek backup`: a party's state, copied consistently while the party runs.

What is copied comes from the layouts (`federation.ops.layout`): every property of `NodeLayout` and
`CoordinatorLayout` is classified in `backup_format.PLANS` (a test keeps the two in step), as kept
state, a secret (copied only with `include_secrets`) or runtime (made again at start: sockets, logs,
pid files, sidecar and gateway configs, FLWR_HOMEs). Each kind of state is copied the way its
writers allow:

- SQLite (`ledger.sqlite`, `superlink.db`): the online backup API (`sqlite3.Connection.backup`),
  one step under one read transaction, so the copy is a committed snapshot with the WAL's pages in
  it (a file copy would miss what is still in `-wal`, or tear a page being written); checked with
  `PRAGMA integrity_check`.
- append-only JSONL (the audit trail, each witness file): read under a shared `flock` of its
  `.lock` and of the file (the locks their writers hold exclusively while appending), together
  with what is kept beside it (`audit.jsonl.head`, checkpoint, frontier cache, sealed segments),
  and cut at the last newline. Under those locks nothing is appended or sealed, so the head names
  the copy's last record and a checkpoint never covers more than the copy holds.
- trees (registry, adapters, explanations, the signed app): written only by rename, so each file
  is read whole; names starting with '.' (a writer's temporary) are skipped; registry run
  summaries are taken before the versions, so every version a summary names is in the backup.

Each file is consistent in itself; the backup is not one instant across files (nothing FedSeek
keeps needs that: a witness line, a version and a run summary are each complete). The result
(`backup_format`) is written beside `out` and renamed into place, 0600 (it holds audit trails and
ledgers). This module imports neither `node` nor `coordinator`: a backup is files, named by the layouts.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import sqlite3
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from federation.ops.atomic import atomic_writer, fsync_dir, private_dir
from federation.ops.backup_format import (
    CHUNK,
    FORMAT,
    LAYOUTS,
    MANIFEST,
    PLANS,
    BackupError,
    PartyKind,
    canonical,
    sign_manifest,
)
from federation.ops.layout import CoordinatorLayout, NodeLayout

__all__ = ["BackupReport", "backup", "detect_kind"]

_SQLITE_SIDE = ("-wal", "-shm", "-journal")
_VERSION_DIR = re.compile(r"global-v\d+")
_SECRET_NAMES = re.compile(r"(.*\.key|key\.pem|.*passphrase.*)")


@dataclass
class BackupReport:
    out: Path
    kind: PartyKind
    files: int
    bytes: int
    manifest_sha256: str
    signed_by: str | None
    secrets: bool
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("fedseek")
    except Exception:  # an uninstalled checkout: the manifest still says what wrote it
        return "unknown"


def detect_kind(state: Path) -> PartyKind:
    """Which party's state `state` is: a coordinator's has `superlink.db` or `registry/`, a node's `ledger.sqlite`."""
    coord, node = CoordinatorLayout(state), NodeLayout(state)
    if coord.superlink_db.exists() or coord.registry.is_dir():
        return "coordinator"
    if node.ledger.exists():
        return "node"
    raise BackupError(f"{state} is neither a coordinator's nor a node's state directory (give --kind)")


class _Stage:
    """Files collected into a staging directory, each hashed as it is written."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.files: list[dict[str, Any]] = []
        self.skipped: list[str] = []

    def put(self, name: str, data: bytes | Path, *, how: str, mode: int) -> None:
        target = self.root / name
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        digest, size = hashlib.sha256(), 0
        if isinstance(data, Path):
            with data.open("rb") as src, target.open("wb") as dst:
                while chunk := src.read(CHUNK):
                    digest.update(chunk)
                    dst.write(chunk)
                    size += len(chunk)
        else:
            target.write_bytes(data)
            digest.update(data)
            size = len(data)
        self.files.append({"path": name, "size": size, "sha256": digest.hexdigest(), "mode": mode & 0o755, "how": how})


@contextlib.contextmanager
def _shared_lock(path: Path) -> Iterator[None]:
    """A shared flock of `path` if it exists: its writers (who lock it exclusively) wait until released."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # releases the lock


def _companions(log: Path) -> list[Path]:
    """What is kept beside an append-only log, named after it (`audit.jsonl.head`, `.checkpoint`, `.tree`,
    `.nodes`, the sealed `.segments/` directory): everything but its lock."""
    prefix = log.name + "."
    return sorted(p for p in log.parent.iterdir() if p.name.startswith(prefix) and not p.name.endswith(".lock"))


def _take_log(stage: _Stage, log: Path, name: str) -> None:
    """An append-only JSONL with its companions, under its writers' locks (`<log>.lock`, which the audit
    trail's and the witness store's writers hold exclusively, and the log itself, which older writers
    locked), cut at a record boundary. Under those locks no record is added and no segment sealed, so
    the head names the copy's last record and a checkpoint covers no more than the copy holds."""
    base = name[: -len(log.name)]
    with _shared_lock(log.with_name(log.name + ".lock")), _shared_lock(log):
        if log.exists():  # (after a seal, the next append makes the active file)
            data = log.read_bytes()
            end = data.rfind(b"\n") + 1  # a writer's partial line (a crash mid-append) is not a record
            stage.put(name, data[:end], how="log", mode=log.stat().st_mode)
        for comp in _companions(log):
            for path in _walk(comp) if comp.is_dir() else [comp]:
                rel = path.relative_to(log.parent).as_posix()
                stage.put(f"{base}{rel}", path.read_bytes(), how="file", mode=path.stat().st_mode)


def _take_sqlite(stage: _Stage, db: Path, name: str, tmp: Path) -> None:
    """A committed snapshot of a live SQLite database through the online backup API, integrity-checked."""
    copy = tmp / f"{db.name}.{len(stage.files)}"
    try:
        src = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=60)
        try:
            dst = sqlite3.connect(copy)
            try:
                src.backup(dst)  # pages=-1: one step, one read transaction: a consistent snapshot
                ok = dst.execute("PRAGMA integrity_check").fetchone()
                dst.execute("PRAGMA journal_mode=DELETE")  # self-contained: no -wal beside the copy
            finally:
                dst.close()
        finally:
            src.close()
    except sqlite3.Error as exc:
        raise BackupError(f"cannot back up the SQLite database {db}: {exc}") from exc
    if not ok or ok[0] != "ok":
        raise BackupError(f"the SQLite database {db} fails its integrity check: {ok[0] if ok else 'no answer'}")
    stage.put(name, copy, how="sqlite", mode=db.stat().st_mode)
    copy.unlink()


def _walk(root: Path) -> Iterator[Path]:
    """Files under `root`, sorted, skipping names that start with '.' (a writer's temporary) and locks."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            if not f.startswith(".") and not f.endswith(".lock"):
                yield Path(dirpath) / f


def _take_tree(stage: _Stage, root: Path, name: str, *, logs: bool = False) -> None:
    """Files written by rename (or, with `logs`, append-only JSONL files under locks). In a registry the run
    summaries come first and the versions (immutable, complete once renamed into place) last."""
    if not root.is_dir():
        return
    tops = sorted(root.iterdir(), key=lambda p: (_VERSION_DIR.fullmatch(p.name) is not None, p.name))
    for top in tops:
        if top.name.startswith(".") or top.name.endswith(".lock"):
            continue
        files = _walk(top) if top.is_dir() else iter([top])
        for path in files:
            if not path.is_file():
                continue
            rel = f"{name}/{path.relative_to(root).as_posix()}"
            if logs and path.suffix == ".jsonl":
                _take_log(stage, path, rel)
            elif logs and any(path.name.startswith(f"{p.name}.") for p in path.parent.glob("*.jsonl")):
                continue  # a log's companion: taken with it, under its lock
            else:
                stage.put(rel, path, how="file", mode=path.stat().st_mode)


def _is_pki_secret(path: Path) -> bool:
    """Private keys (the CA's is encrypted, still a secret), passphrase files, and anything only its owner may read."""
    return _SECRET_NAMES.fullmatch(path.name) is not None or not path.stat().st_mode & 0o044


def _archive_mode(out: Path) -> str | None:
    name = out.name
    if name.endswith((".tar.gz", ".tgz")):
        return "w:gz"
    if name.endswith(".tar"):
        return "w"
    return None


def backup(
    state: Path,
    out: Path,
    *,
    kind: PartyKind | None = None,
    name: str = "",
    pki: Path | None = None,
    include_secrets: bool = False,
    sign_key: Path | None = None,
    sign_cert: Path | None = None,
) -> BackupReport:
    """Back up the party state in `state` (and the PKI directory `pki`) to `out`, a tar archive or a new directory.

    Consistent while the party runs (see the module doc). Secrets (site key, API key, agent token; in the
    PKI private keys and passphrase files) only with `include_secrets`. With `sign_key` and `sign_cert`
    the manifest is signed (the party's own key: `pki/<name>/key.pem`).
    """
    started = time.monotonic()
    if not state.is_dir():
        raise BackupError(f"no state directory at {state}")
    kind = kind or detect_kind(state)
    if out.exists():
        raise BackupError(f"{out} exists; a backup never overwrites one")
    if not out.parent.is_dir():
        raise BackupError(f"no directory {out.parent} to write the backup into")
    layout = LAYOUTS[kind](state)
    plan = PLANS[kind]
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    os.chmod(work, 0o700)
    try:
        stage = _Stage(work / "data")
        private_dir(stage.root)
        tmp = private_dir(work / "tmp")
        paths = layout.paths()
        claimed: set[Path] = set()
        for prop, how in plan.items():
            path = paths[prop]
            claimed.add(path)
            if how in ("sqlite", "log"):
                claimed.update(path.with_name(path.name + s) for s in _SQLITE_SIDE)
                claimed.update(path.with_name(path.name + s) for s in (".lock",))
                claimed.update(_companions(path))
            if how == "runtime" or not (path.exists() or (how == "log" and _companions(path))):
                continue
            rel = f"state/{path.relative_to(state).as_posix()}"
            if how == "secret":
                if include_secrets:
                    stage.put(rel, path, how="secret", mode=path.stat().st_mode)
                else:
                    stage.skipped.append(f"{rel} (secret)")
            elif how == "sqlite":
                _take_sqlite(stage, path, rel, tmp)
            elif how == "log":
                _take_log(stage, path, rel)
            elif how in ("tree", "logs"):
                _take_tree(stage, path, rel, logs=how == "logs")
            else:
                stage.put(rel, path, how="file", mode=path.stat().st_mode)
        for entry in sorted(state.iterdir()):  # what no layout names: listed, never silently dropped
            if entry not in claimed:
                stage.skipped.append(f"state/{entry.name} (not part of a {kind}'s layout)")
        if pki is not None:
            _take_pki(stage, pki, include_secrets=include_secrets)
        shutil.rmtree(tmp)
        manifest: dict[str, Any] = {
            "format": FORMAT,
            "party": {"kind": kind, "name": name},
            "created_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "fedseek_version": _version(),
            "secrets": include_secrets,
            "pki": pki is not None,
            "files": stage.files,
            "skipped": stage.skipped,
        }
        signer = None
        if sign_key is not None and sign_cert is not None:
            manifest["signature"] = sign_manifest(canonical(manifest), sign_key, sign_cert)
            signer = name
        body = json.dumps(manifest, indent=1, sort_keys=True).encode("utf-8")
        (stage.root / MANIFEST).write_bytes(body)
        _publish(stage.root, stage.files, out)
        return BackupReport(
            out=out,
            kind=kind,
            files=len(stage.files),
            bytes=sum(int(f["size"]) for f in stage.files),
            manifest_sha256=hashlib.sha256(body).hexdigest(),
            signed_by=signer,
            secrets=include_secrets,
            skipped=stage.skipped,
            seconds=time.monotonic() - started,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _take_pki(stage: _Stage, pki: Path, *, include_secrets: bool) -> None:
    if not (pki / "ca" / "ca.pem").is_file() and not any(pki.glob("*/cert.pem")):
        raise BackupError(f"{pki} is not a PKI directory (no ca/ca.pem, no party certificate)")
    for path in _walk(pki):
        rel = f"pki/{path.relative_to(pki).as_posix()}"
        if _is_pki_secret(path):
            if include_secrets:
                stage.put(rel, path, how="secret", mode=path.stat().st_mode)
            else:
                stage.skipped.append(f"{rel} (secret)")
        else:
            stage.put(rel, path, how="file", mode=path.stat().st_mode)


def _publish(data: Path, files: list[dict[str, Any]], out: Path) -> None:
    """`data` as `out`: a tar archive (manifest first, then the files in manifest order) or a directory, 0600/0700,
    written beside `out` and renamed into place, so `out` is whole or absent."""
    mode = _archive_mode(out)
    if mode is None:
        os.replace(data, out)
        fsync_dir(out.parent)
        return
    with atomic_writer(out, suffix=".partial") as fh, tarfile.open(fileobj=fh, mode=mode) as tar:  # type: ignore[call-overload]
        for name in [MANIFEST, *(f["path"] for f in files)]:
            info = tar.gettarinfo(str(data / name), arcname=name)
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            with (data / name).open("rb") as src:
                tar.addfile(info, src)
