"""Issue 15, finding 2: a site key the SuperLink already holds is read back from its own database.

The database is made by Flower's own SQL link state (the one `flower-superlink --database` uses),
so the schema and the stored key format are Flower's, not a copy of them.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from coordinator.sites import flwr_supernode, known_node
from federation.security.flower_auth import ensure_auth_keypair


def _superlink_state(db: Path):  # type: ignore[no-untyped-def]
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.superlink.federation import NoOpFederationManager

    return LinkStateFactory(str(db), NoOpFederationManager(), ObjectStoreFactory()).state()


def _flower_bytes(public_key: Path) -> bytes:
    key = serialization.load_ssh_public_key(public_key.read_bytes())
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def test_a_registered_key_is_found_with_its_node_id_and_status(tmp_path: Path) -> None:
    db = tmp_path / "superlink.db"
    keys = {name: ensure_auth_keypair(tmp_path / name).public_key for name in ("site-a", "site-b", "site-c")}
    state = _superlink_state(db)
    ids = {
        name: state.create_node(
            owner_aid="a", owner_name="n", public_key=_flower_bytes(key), heartbeat_interval=30, name=name
        )
        for name, key in list(keys.items())[:2]
    }
    assert all(ids.values())
    found = known_node(db, keys["site-a"])
    assert found is not None and found.node_id == ids["site-a"] and found.status == "registered"
    assert known_node(db, keys["site-c"]) is None  # never registered
    state.delete_node(owner_aid="a", node_id=ids["site-b"])
    gone = known_node(db, keys["site-b"])
    assert gone is not None and gone.node_id == ids["site-b"] and gone.status == "unregistered"
    with pytest.raises(ValueError, match="Public key already in use"):  # why the lookup is needed
        state.create_node(
            owner_aid="a", owner_name="n", public_key=_flower_bytes(keys["site-b"]), heartbeat_interval=30
        )


def test_no_database_no_key_file_no_answer(tmp_path: Path) -> None:
    key = ensure_auth_keypair(tmp_path / "k").public_key
    assert known_node(tmp_path / "missing.db", key) is None
    assert known_node(tmp_path / "missing.db", tmp_path / "nokey.pub") is None


def test_a_flwr_json_error_names_its_reason() -> None:
    """`flwr ... --format json` prints its error as indented JSON; the message, not its closing
    brace (the issue's `register failed: }`), is what the operator reads."""
    out = json.dumps(
        {"success": False, "error-message": "\nPublic key already in use while registering node"}, indent=2
    )
    done = subprocess.CompletedProcess(args=["flwr"], returncode=1, stdout=out, stderr="")
    with pytest.raises(RuntimeError, match=r"^flwr supernode register failed: Public key already in use while"):
        flwr_supernode(["register", "k.pub"], flwr=lambda args: done)


def test_a_site_revoked_while_the_coordinator_was_down_is_unregistered_at_start(tmp_path: Path) -> None:
    """What the SuperLink still holds for a site that lost its certificate while the coordinator was
    down is unregistered on the next start (the fresh SiteAccess has no memory of it); a valid site's
    key is left alone. SuperLink calls are recorded; the database and PKI are real."""
    from coordinator.sites import SiteAccess
    from federation.security import pki
    from federation.security.site_binding import register_site_key
    from privacy.audit import AuditTrail

    root = tmp_path / "pki"
    pki.init_ca(root, consortium="restart-test")
    for site in ("site-a", "site-b"):
        pki.issue(root, site, role="node")
        register_site_key(root, site)
    db = tmp_path / "superlink.db"
    state = _superlink_state(db)
    ids = {
        site: state.create_node(
            owner_aid="a",
            owner_name="n",
            public_key=_flower_bytes(root / "site-keys" / f"{site}.pub"),
            heartbeat_interval=30,
        )
        for site in ("site-a", "site-b")
    }
    pki.revoke(root, "site-b")
    calls: list[tuple[str, object]] = []
    sites = SiteAccess(
        pki_dir=root,
        site_keys_dir=root / "site-keys",
        audit=AuditTrail(tmp_path / "audit.jsonl"),
        register=lambda key, name: calls.append(("register", name)) or ids[name],  # type: ignore[func-returns-value]
        unregister=lambda node_id: calls.append(("unregister", node_id)),
        lookup=lambda key: known_node(db, key),
    )
    assert sites.sync() == {"site-a": ids["site-a"]}
    assert calls == [("register", "site-a"), ("unregister", ids["site-b"])]
    actions = [json.loads(line)["action"] for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert actions == ["site.registered", "site.unregistered"]
