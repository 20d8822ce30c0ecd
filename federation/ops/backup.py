"""`fedseek backup` / `fedseek restore`: a party's state, copied consistently while it runs, restored only intact.

What is copied comes from the layouts (`federation.ops.layout`): every property of `NodeLayout` and
`CoordinatorLayout` is classified in `PLANS` (a test keeps the two in step), as kept state, a secret
(copied only with `include_secrets`) or runtime (made again at start: sockets, logs, pid files,
sidecar and gateway configs, FLWR_HOMEs). Each kind of state is copied the way its writers allow:

- SQLite (`ledger.sqlite`, `superlink.db`): the online backup API (`sqlite3.Connection.backup`),
  one step under one read transaction, so the copy is a committed snapshot with the WAL's pages in
  it (a file copy would miss what is still in `-wal`, or tear a page being written); checked with
  `PRAGMA integrity_check`.
- append-only JSONL (the audit trail, each witness file): read under a shared `flock` of the file
  and of its `.lock` (the locks their writers hold exclusively while appending), together with the
  companions beside it (`audit.jsonl.head`, checkpoint, frontier cache), and cut at the last
  newline. The companions are taken under the same lock, so the head names the copy's last record
  and a checkpoint never covers more than the copy holds.
- trees (registry, adapters, explanations, the signed app): written only by rename, so each file
  is read whole; names starting with '.' (a writer's temporary) are skipped, registry run
  summaries are taken before the versions, so every version a summary names is in the backup.

A backup is a directory or a tar archive (`.tar`, `.tar.gz`, `.tgz`) holding `MANIFEST.json`
(format, party kind and name, time, FedSeek version, whether secrets are in it, and every file's
path, size, sha256 and mode) and the files under `state/` (and `pki/` with a PKI directory). With
the party's key (`pki/<name>/key.pem`) the manifest is signed (ECDSA-SHA256) and carries its
certificate; otherwise it is unsigned and only its sha256 identifies it (`BackupReport.manifest_sha256`,
printed for the operator to keep apart). It is always 0600: it holds audit trails and ledgers.

`restore` checks before it writes anything in place: the signature (against `ca` when given; a
backup without one is then refused), every file's size and sha256 (a mismatch, a missing, extra or
duplicate member, a truncated archive: refused, naming the file), SQLite integrity; it refuses a
non-empty destination unless `force`, and a destination a live party runs on, always. Files are
unpacked into a temporary directory beside the destination and renamed into place; with `force`
the old directory is kept beside it (`<dir>.replaced-<time>`), never deleted.

This module imports neither `node` nor `coordinator`: a backup is files, named by the layouts.
"""

from __future__ import annotations

import base64
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from federation.errors import Conflict, InvalidInput
from federation.ops.atomic import fsync_dir, private_dir
from federation.ops.layout import CoordinatorLayout, NodeLayout

__all__ = [
    "FORMAT",
    "MANIFEST",
    "PLANS",
    "BackupError",
    "BackupReport",
    "PartyKind",
    "RestoreReport",
    "StateInUse",
    "backup",
    "detect_kind",
    "read_manifest",
    "restore",
]

FORMAT = "fedseek-backup/1"
MANIFEST = "MANIFEST.json"
_MAX_MANIFEST = 64 << 20
_CHUNK = 1 << 20

PartyKind = Literal["coordinator", "node"]
How = Literal["sqlite", "log", "logs", "tree", "file", "secret", "runtime"]

# Every layout property, by how a backup takes it. "log": one append-only JSONL (and its companions);
# "logs": a directory of them; "tree": files written by rename; "secret": only with include_secrets.
PLANS: dict[PartyKind, dict[str, How]] = {
    "node": {
        "audit": "log",
        "ledger": "sqlite",
        "agent_token": "secret",
        "api_key": "secret",
        "site_secret": "secret",
        "api_key_digests": "file",
        "api_keys_lock": "runtime",
        "access_policy": "file",
        "adapters": "tree",
        "explanations": "tree",
        "sidecar": "runtime",
        "sockets": "runtime",
        "fleet_socket": "runtime",
        "relay_socket": "runtime",
        "agent_socket": "runtime",
        "runtime_socket": "runtime",
        "logs": "runtime",
        "supernode_log": "runtime",
        "flwr_home": "runtime",
        "superexec_secret": "runtime",  # new at every start
        "app_guard_home": "runtime",
        "app_guard_log": "runtime",
        "endpoints": "runtime",
    },
    "coordinator": {
        "audit": "log",
        "registry": "tree",
        "superlink_db": "sqlite",
        "witness": "logs",
        "gateway": "runtime",  # config and site bindings are written again from the PKI at start
        "logs": "runtime",
        "superlink_log": "runtime",
        "control": "runtime",
        "superlink_socket": "runtime",
        "flwr_home": "runtime",
        "signed_app": "tree",
        "flwr_cli": "runtime",
        "endpoints": "runtime",
    },
}
_LAYOUTS: dict[PartyKind, Callable[[Path], CoordinatorLayout | NodeLayout]] = {
    "node": NodeLayout,
    "coordinator": CoordinatorLayout,
}
_SQLITE_SIDE = ("-wal", "-shm", "-journal")
_VERSION_DIR = re.compile(r"global-v\d+")
_SECRET_NAMES = re.compile(r"(.*\.key|key\.pem|.*passphrase.*)")


class BackupError(InvalidInput):
    """A backup cannot be made, or is refused on restore (damaged, altered, incomplete): one line naming the file."""


class StateInUse(Conflict):
    """The destination holds state (restore without --force) or a party runs on it."""


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


# ---- helpers ----------------------------------------------------------------------------------------------
def _canonical(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


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


def _running_pid(state: Path, kind: PartyKind) -> int | None:
    """The pid a live party wrote into `state`'s endpoints file, or None."""
    path = _LAYOUTS[kind](state).endpoints
    try:
        pid = int(json.loads(path.read_text())["pid"])
        os.kill(pid, 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return pid


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
                while chunk := src.read(_CHUNK):
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


# ---- signing ---------------------------------------------------------------------------------------------
def _sign(body: bytes, key_pem: Path, cert_pem: Path) -> dict[str, str]:
    try:
        key = serialization.load_pem_private_key(key_pem.read_bytes(), password=None)
        cert = x509.load_pem_x509_certificate(cert_pem.read_bytes())
    except (OSError, ValueError, TypeError) as exc:
        raise BackupError(f"cannot sign the backup with {key_pem}: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise BackupError(f"cannot sign the backup with {key_pem}: not an EC key")
    return {
        "alg": "ecdsa-sha256",
        "certificate": cert.public_bytes(serialization.Encoding.PEM).decode("ascii"),
        "value": base64.b64encode(key.sign(body, ec.ECDSA(hashes.SHA256()))).decode("ascii"),
    }


def _subject(cert: x509.Certificate) -> str:
    cns = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(cns[0].value) if cns else cert.subject.rfc4514_string()


def _verify(manifest: dict[str, Any], *, ca: Path | None) -> str | None:
    """The signer's name if the manifest is signed and the signature holds (and, with `ca`, its certificate
    was issued by that CA to the party the manifest names); None if unsigned and no `ca` asks for one."""
    sig = manifest.get("signature")
    if sig is None:
        if ca is not None:
            raise BackupError("the backup's manifest is not signed, and --ca asks for a signed one")
        return None
    body = _canonical({k: v for k, v in manifest.items() if k != "signature"})
    try:
        cert = x509.load_pem_x509_certificate(str(sig["certificate"]).encode("ascii"))
        key = cert.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey) or sig.get("alg") != "ecdsa-sha256":
            raise BackupError("the backup's manifest signature is of an unknown kind")
        key.verify(base64.b64decode(str(sig["value"]), validate=True), body, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise BackupError("the backup's manifest does not match its signature (altered after it was made)") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise BackupError(f"the backup's manifest signature is unreadable: {exc}") from None
    signer = _subject(cert)
    if signer != manifest["party"].get("name"):
        raise BackupError(f"the backup names party {manifest['party'].get('name')!r} but is signed by {signer!r}")
    if ca is not None:
        try:
            cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca.read_bytes()))
        except (OSError, ValueError, TypeError, InvalidSignature) as exc:
            raise BackupError(
                f"the backup's signer {signer!r} is not certified by {ca}: {exc or 'bad signature'}"
            ) from None
    return signer


# ---- backup ----------------------------------------------------------------------------------------------
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
    layout = _LAYOUTS[kind](state)
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
            manifest["signature"] = _sign(_canonical(manifest), sign_key, sign_cert)
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
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as fh:
            with tarfile.open(fileobj=fh, mode=mode) as tar:  # type: ignore[call-overload]
                for name in [MANIFEST, *(f["path"] for f in files)]:
                    info = tar.gettarinfo(str(data / name), arcname=name)
                    info.uid = info.gid = 0
                    info.uname = info.gname = ""
                    with (data / name).open("rb") as src:
                        tar.addfile(info, src)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    fsync_dir(out.parent)


# ---- restore ---------------------------------------------------------------------------------------------
def _check_manifest(raw: bytes) -> dict[str, Any]:
    try:
        manifest = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BackupError(f"the backup's {MANIFEST} is not JSON: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BackupError(f"not a FedSeek backup ({MANIFEST} is not of format {FORMAT})")
    party = manifest.get("party")
    if not isinstance(party, dict) or party.get("kind") not in PLANS:
        raise BackupError(f"the backup's {MANIFEST} names no party kind")
    files = manifest.get("files")
    if not isinstance(files, list):
        raise BackupError(f"the backup's {MANIFEST} lists no files")
    seen: set[str] = set()
    for f in files:
        path = f.get("path") if isinstance(f, dict) else None
        if not isinstance(path, str) or not _safe_name(path) or path in seen:
            raise BackupError(f"the backup's {MANIFEST} lists an unsafe or repeated path: {path!r}")
        if not isinstance(f.get("size"), int) or not re.fullmatch(r"[0-9a-f]{64}", str(f.get("sha256"))):
            raise BackupError(f"the backup's {MANIFEST} entry for {path} has no size or sha256")
        seen.add(path)
    return manifest


def _safe_name(name: str) -> bool:
    parts = name.split("/")
    return (
        parts[0] in ("state", "pki")
        and len(parts) > 1
        and all(p not in ("", ".", "..") for p in parts)
        and "\\" not in name
        and "\0" not in name
    )


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
                    raw = fh.read(_MAX_MANIFEST + 1)
            except OSError as exc:
                raise BackupError(f"the backup {self.path} has no readable {MANIFEST}: {exc.strerror}") from None
            if len(raw) > _MAX_MANIFEST:
                raise BackupError(f"the backup's {MANIFEST} is not a plain file of at most 64 MiB")
            return raw
        try:
            member = self._tar.getmember(MANIFEST)
            stream = self._tar.extractfile(member) if member.isfile() and member.size <= _MAX_MANIFEST else None
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
    manifest = _check_manifest(raw)
    return manifest, hashlib.sha256(raw).hexdigest(), _verify(manifest, ca=ca)


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
        manifest = _check_manifest(raw)
        signer = _verify(manifest, ca=ca)
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
        while chunk := stream.read(_CHUNK):
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
        if exc.errno != 18:  # EXDEV: another filesystem, copy then rename there
            raise
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.restore-", dir=dest.parent))
        shutil.copytree(staged, tmp, dirs_exist_ok=True)
        os.replace(tmp, dest)
    fsync_dir(dest.parent)
    return moved
