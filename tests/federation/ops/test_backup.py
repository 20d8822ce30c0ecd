"""`federation.ops.backup`: what a backup holds, that it is consistent while written to, and that restore
refuses anything but the backup as it was made."""

from __future__ import annotations

import fcntl
import hashlib
import json
import multiprocessing
import os
import sqlite3
import tarfile
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from federation.ops.backup import backup
from federation.ops.backup_format import MANIFEST, PLANS, BackupError, StateInUse
from federation.ops.layout import CoordinatorLayout, NodeLayout
from federation.ops.restore import read_manifest, restore


def test_every_layout_path_is_classified() -> None:
    """A file added to a layout must be given a way to be backed up (or be called runtime) here."""
    assert set(PLANS["node"]) == set(NodeLayout(Path("/s")).paths())
    assert set(PLANS["coordinator"]) == set(CoordinatorLayout(Path("/s")).paths())


def _ledger(path: Path, rows: int = 3) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE IF NOT EXISTS spend (id INTEGER PRIMARY KEY, eps REAL)")
    for i in range(rows):
        conn.execute("INSERT INTO spend (eps) VALUES (?)", (0.1 * i,))
    conn.close()


def _node_state(root: Path) -> NodeLayout:
    layout = NodeLayout(root)
    root.mkdir(mode=0o700)
    _ledger(layout.ledger)
    layout.audit.write_text('{"seq":1}\n{"seq":2}\n')
    Path(str(layout.audit) + ".head").write_text('{"seq":2}')
    layout.site_secret.write_bytes(os.urandom(32))
    layout.api_key.write_text("sk-secret")
    layout.agent_token.write_text("token")
    layout.access_policy.write_text("p, admin, *, *\n")
    (layout.adapters / "global-v0001").mkdir(parents=True)
    (layout.adapters / "global-v0001" / "adapter.safetensors").write_bytes(b"weights")
    (layout.adapters / ".global-v0002.tmp").mkdir()  # a writer's temporary: never backed up
    layout.logs.mkdir()
    layout.supernode_log.write_text("runtime noise")
    layout.endpoints.write_text(json.dumps({"pid": 999999999}))
    return layout


def _coordinator_state(root: Path) -> CoordinatorLayout:
    layout = CoordinatorLayout(root)
    root.mkdir(mode=0o700)
    _ledger(layout.superlink_db)
    for v in ("global-v0001", "global-v0002"):
        (layout.registry / v).mkdir(parents=True)
        (layout.registry / v / "manifest.json").write_text(json.dumps({"version": v}))
    (layout.registry / "runs").mkdir()
    (layout.registry / "runs" / "first.json").write_text('{"status":"finished"}')
    (layout.witness / "site-a").mkdir(parents=True)
    (layout.witness / "site-a" / "ledger.head.jsonl").write_text('{"a":1}\n{"a":2}\n{"a":3')  # torn last line
    (layout.witness / "site-a" / "ledger.head.jsonl.lock").touch()
    layout.audit.write_text('{"seq":1}\n')
    layout.gateway.mkdir()
    (layout.gateway / "nginx.conf").write_text("runtime")
    return layout


def _names(out: Path) -> set[str]:
    manifest, _, _ = read_manifest(out)
    return {f["path"] for f in manifest["files"]}


def test_node_backup_holds_state_not_runtime_and_no_secrets_by_default(tmp_path: Path) -> None:
    _node_state(tmp_path / "site")
    out = tmp_path / "site.tar"
    report = backup(tmp_path / "site", out, name="site-a")
    assert report.kind == "node" and report.signed_by is None and not report.secrets
    names = _names(out)
    assert {
        "state/ledger.sqlite",
        "state/audit.jsonl",
        "state/audit.jsonl.head",
        "state/access-policy.csv",
        "state/adapters/global-v0001/adapter.safetensors",
    } <= names
    assert not any("site.key" in n or n.rsplit("/", 1)[-1] == "api-key" or "agent.token" in n for n in names)
    assert not any(n.startswith(("state/logs", "state/node.json")) or ".global-v0002" in n for n in names)
    assert {"state/site.key (secret)", "state/api-key (secret)", "state/agent.token (secret)"} <= set(report.skipped)
    assert out.stat().st_mode & 0o777 == 0o600
    with tarfile.open(out) as tar:
        assert tar.getnames()[0] == MANIFEST

    with_secrets = tmp_path / "secrets.tar.gz"
    backup(tmp_path / "site", with_secrets, include_secrets=True)
    assert {"state/site.key", "state/api-key", "state/agent.token"} <= _names(with_secrets)
    assert with_secrets.stat().st_mode & 0o777 == 0o600

    restored = tmp_path / "restored"
    report2 = restore(with_secrets, restored)
    assert (restored / "site.key").read_bytes() == (tmp_path / "site" / "site.key").read_bytes()
    assert (restored / "site.key").stat().st_mode & 0o777 == 0o600
    assert restored.stat().st_mode & 0o777 == 0o700
    assert report2.kind == "node" and not (restored / "node.json").exists() and not (restored / "logs").exists()
    with sqlite3.connect(restored / "ledger.sqlite") as conn:
        assert conn.execute("SELECT COUNT(*) FROM spend").fetchone() == (3,)


def test_coordinator_backup_cuts_logs_at_a_record_and_skips_runtime(tmp_path: Path) -> None:
    _coordinator_state(tmp_path / "coord")
    out = tmp_path / "coord-backup"  # a directory
    backup(tmp_path / "coord", out)
    names = _names(out)
    assert {
        "state/superlink.db",
        "state/registry/runs/first.json",
        "state/registry/global-v0002/manifest.json",
        "state/witness/site-a/ledger.head.jsonl",
        "state/audit.jsonl",
    } <= names
    assert not any("gateway" in n or n.endswith(".lock") for n in names)
    assert (out / "state/witness/site-a/ledger.head.jsonl").read_text() == '{"a":1}\n{"a":2}\n'
    manifest = json.loads((out / MANIFEST).read_text())
    order = [f["path"] for f in manifest["files"]]
    assert order.index("state/registry/runs/first.json") < order.index("state/registry/global-v0001/manifest.json")
    restore(out, tmp_path / "standby")
    assert sorted(p.name for p in (tmp_path / "standby" / "registry").iterdir()) == [
        "global-v0001",
        "global-v0002",
        "runs",
    ]


def _corrupt_member(src: Path, dst: Path, name: str, change: bytes) -> None:
    """A copy of the archive `src` with member `name`'s bytes replaced by `change` (manifest untouched)."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for m in tin.getmembers():
            data = tin.extractfile(m).read()  # type: ignore[union-attr]
            if m.name == name:
                data = change
                m.size = len(data)
            import io

            tout.addfile(m, io.BytesIO(data))


def test_restore_refuses_a_tampered_file_naming_it_and_writes_nothing(tmp_path: Path) -> None:
    _node_state(tmp_path / "site")
    out = tmp_path / "b.tar"
    backup(tmp_path / "site", out)
    bad = tmp_path / "bad.tar"
    _corrupt_member(out, bad, "state/audit.jsonl", b'{"seq":1}\n')  # a record cut off: the rollback an insider wants
    with pytest.raises(BackupError, match=r"backup file state/audit\.jsonl: .* \(damaged or altered\)"):
        restore(bad, tmp_path / "r")
    assert not (tmp_path / "r").exists()
    assert [p.name for p in tmp_path.iterdir() if "restore" in p.name] == []  # no staging left behind

    same_size = tmp_path / "same-size.tar"
    original = (tmp_path / "site" / "access-policy.csv").read_bytes()
    _corrupt_member(out, same_size, "state/access-policy.csv", original.replace(b"admin", b"anyon"))
    with pytest.raises(BackupError, match=r"state/access-policy\.csv: sha256 does not match"):
        restore(same_size, tmp_path / "r")


def test_restore_refuses_partial_corrupt_or_padded_archives(tmp_path: Path) -> None:
    _node_state(tmp_path / "site")
    out = tmp_path / "b.tar"
    backup(tmp_path / "site", out)
    raw = out.read_bytes()
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(BackupError, match=r"damaged or truncated|missing \(the backup is incomplete\)|bytes, the man"):
        restore(truncated, tmp_path / "r1")
    assert not (tmp_path / "r1").exists()

    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(os.urandom(4096))
    with pytest.raises(BackupError, match=r"not a readable backup archive|no MANIFEST"):
        restore(garbage, tmp_path / "r2")

    extra = tmp_path / "extra.tar"
    import io

    with tarfile.open(out) as tin, tarfile.open(extra, "w") as tout:
        for m in tin.getmembers():
            tout.addfile(m, tin.extractfile(m))
        info = tarfile.TarInfo("state/ledger.sqlite-wal")
        info.size = 3
        tout.addfile(info, io.BytesIO(b"wal"))
    with pytest.raises(BackupError, match=r"backup file state/ledger\.sqlite-wal: not in the manifest"):
        restore(extra, tmp_path / "r3")

    dropped = tmp_path / "dropped.tar"
    with tarfile.open(out) as tin, tarfile.open(dropped, "w") as tout:
        for m in tin.getmembers():
            if m.name != "state/ledger.sqlite":
                tout.addfile(m, tin.extractfile(m))
    with pytest.raises(BackupError, match=r"backup file state/ledger\.sqlite: missing"):
        restore(dropped, tmp_path / "r4")


def test_a_manifest_edited_to_match_is_caught_by_its_signature(tmp_path: Path) -> None:
    """sha256s alone stop damage, not someone who rewrites the manifest too; a signed manifest stops that,
    and `ca` ties the signer to the consortium."""
    ca_key, ca_cert = _cert("ca", None)
    key, cert = _cert("coordinator", (ca_key, ca_cert))
    key_pem, cert_pem, ca_pem = tmp_path / "key.pem", tmp_path / "cert.pem", tmp_path / "ca.pem"
    key_pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, _none()))
    cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    ca_pem.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    _coordinator_state(tmp_path / "coord")
    out = tmp_path / "signed"
    report = backup(tmp_path / "coord", out, name="coordinator", sign_key=key_pem, sign_cert=cert_pem)
    assert report.signed_by == "coordinator"
    assert restore(out, tmp_path / "ok", ca=ca_pem, check_only=True).signed_by == "coordinator"

    # An insider drops a witnessed head and fixes the manifest's size and sha256 to match.
    witness = out / "state/witness/site-a/ledger.head.jsonl"
    witness.write_text('{"a":1}\n')
    manifest = json.loads((out / MANIFEST).read_text())
    for f in manifest["files"]:
        if f["path"] == "state/witness/site-a/ledger.head.jsonl":
            f["size"], f["sha256"] = witness.stat().st_size, hashlib.sha256(witness.read_bytes()).hexdigest()
    (out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BackupError, match="does not match its signature"):
        restore(out, tmp_path / "r")
    # ... and re-signing with a key of their own is refused against the consortium CA.
    del manifest["signature"]
    (out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BackupError, match="not signed, and --ca asks for a signed one"):
        restore(out, tmp_path / "r", ca=ca_pem)
    own_key, own_cert = _cert("coordinator", None)
    key_pem.write_bytes(own_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, _none()))
    cert_pem.write_bytes(own_cert.public_bytes(serialization.Encoding.PEM))
    forged = tmp_path / "forged.tar"
    backup(tmp_path / "coord", forged, name="coordinator", sign_key=key_pem, sign_cert=cert_pem)
    with pytest.raises(BackupError, match="is not certified by"):
        restore(forged, tmp_path / "r", ca=ca_pem)
    assert not (tmp_path / "r").exists()


def _none() -> serialization.KeySerializationEncryption:
    return serialization.NoEncryption()


def _cert(
    cn: str, issuer: tuple[ec.EllipticCurvePrivateKey, x509.Certificate] | None
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    import datetime as dt

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    signer_key, issuer_name = (issuer[0], issuer[1].subject) if issuer else (key, name)
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(signer_key, hashes.SHA256())
    )
    return key, cert


def test_restore_refuses_a_non_empty_or_live_state_unless_forced(tmp_path: Path) -> None:
    layout = _node_state(tmp_path / "site")
    out = tmp_path / "b.tar"
    backup(tmp_path / "site", out)
    target = tmp_path / "target"
    target.mkdir()
    (target / "precious").write_text("x")
    with pytest.raises(StateInUse, match="is not empty: restore into a new directory, or pass --force"):
        restore(out, target)
    assert (target / "precious").exists()
    report = restore(out, target, force=True)
    assert (target / "ledger.sqlite").exists() and not (target / "precious").exists()
    assert [p.name for p in report.replaced] and (report.replaced[0] / "precious").read_text() == "x"
    # A live party on the destination: never, not even with --force.
    layout.endpoints.write_text(json.dumps({"pid": os.getpid()}))
    with pytest.raises(StateInUse, match=f"a node is running on .* \\(pid {os.getpid()}\\)"):
        restore(out, tmp_path / "site", force=True)
    with pytest.raises(BackupError, match="exists; a backup never overwrites one"):
        backup(tmp_path / "site", out)


def _sqlite_writer(
    path: str, stop: multiprocessing.synchronize.Event, committed: multiprocessing.sharedctypes.Synchronized
) -> None:  # type: ignore[name-defined]
    """Pairs of rows, one transaction each (the invariant: an even count, every pair complete); the WAL is
    never checkpointed, so a file copy of the main database misses them."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA wal_autocheckpoint=0")
    n = 0
    while not stop.is_set():
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO spend (eps) VALUES (?)", (n,))
        conn.execute("INSERT INTO spend (eps) VALUES (?)", (-n,))
        conn.execute("COMMIT")
        n += 1
        committed.value = n
    conn.close()


def test_sqlite_is_copied_consistently_while_a_writer_writes(tmp_path: Path) -> None:
    state = tmp_path / "site"
    state.mkdir()
    db = NodeLayout(state).ledger
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE spend (id INTEGER PRIMARY KEY, eps REAL)")
    conn.close()
    ctx = multiprocessing.get_context("spawn")
    stop, committed = ctx.Event(), ctx.Value("q", 0)
    writer = ctx.Process(target=_sqlite_writer, args=(str(db), stop, committed))
    writer.start()
    try:
        deadline = time.monotonic() + 60
        while committed.value < 50:
            assert time.monotonic() < deadline and writer.is_alive()
            time.sleep(0.05)
        for i in range(5):
            before = committed.value
            out = tmp_path / f"b{i}.tar"
            backup(state, out, kind="node")
            restore(out, tmp_path / f"r{i}")
            with sqlite3.connect(tmp_path / f"r{i}" / "ledger.sqlite") as copy:
                count, total = copy.execute("SELECT COUNT(*), SUM(eps) FROM spend").fetchone()
            assert count % 2 == 0 and total == 0  # no torn transaction
            assert count // 2 >= before  # every pair committed before the backup began is in it
        assert (db.with_name(db.name + "-wal")).stat().st_size > 0  # the rows really were in the WAL
    finally:
        stop.set()
        writer.join(30)


def _jsonl_writer(path: str, stop: multiprocessing.synchronize.Event) -> None:  # type: ignore[name-defined]
    """A witness-store style writer: exclusive flock of `<log>.lock`, then a record in two writes (a reader
    without the lock can see half of it), and a head file naming the last record."""
    log = Path(path)
    head = log.with_name(log.name + ".head")
    n = 0
    while not stop.is_set():
        n += 1
        fd = os.open(log.with_name(log.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            with log.open("a") as fh:
                fh.write(json.dumps({"seq": n, "pad": "x" * 500})[:100])
                fh.flush()
                fh.write(json.dumps({"seq": n, "pad": "x" * 500})[100:] + "\n")
            head.write_text(str(n))
        finally:
            os.close(fd)


def test_an_append_only_log_is_copied_under_its_writers_lock(tmp_path: Path) -> None:
    state = tmp_path / "coord"
    layout = _coordinator_state(state)
    log = layout.witness / "site-b" / "ledger.head.jsonl"
    log.parent.mkdir()
    ctx = multiprocessing.get_context("spawn")
    stop = ctx.Event()
    writer = ctx.Process(target=_jsonl_writer, args=(str(log), stop))
    writer.start()
    try:
        deadline = time.monotonic() + 60
        while not log.exists() or log.stat().st_size < 20000:
            assert time.monotonic() < deadline and writer.is_alive()
            time.sleep(0.05)
        for i in range(5):
            out = tmp_path / f"b{i}"
            backup(state, out)
            lines = (out / "state/witness/site-b/ledger.head.jsonl").read_text().splitlines()
            head = (out / "state/witness/site-b/ledger.head.jsonl.head").read_text()
            assert [json.loads(x)["seq"] for x in lines] == list(range(1, len(lines) + 1))
            assert head == str(len(lines))  # head and log taken together, under the lock
    finally:
        stop.set()
        writer.join(30)
