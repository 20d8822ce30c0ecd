"""Encryption at rest at a node: a site with a KEK keeps its adapters, training data and explanations
encrypted; it restarts and serves them; without the KEK, or with a file altered, it refuses to start
with one line naming the file; `fedseek keys rotate` moves every file to a new KEK."""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from federation.ops.layout import NodeLayout
from federation.protocol import config as cfg
from federation.protocol import wire
from federation.protocol.config import NodeConfig
from federation.security.at_rest import (
    MAGIC,
    CommandKek,
    Envelope,
    body_offset,
    encrypted_files,
    header_kek_id,
    site_envelope,
)
from node.build import NodeStartError, build_node
from node.data import SiteData
from node.site_keys import SealError, SiteKeys
from privacy.audit import AuditRecord, scan, verify
from privacy.audit_payload import SEALED, PayloadSealer
from tests.node.test_build import adapter_arrays


def _passphrase(path: Path, text: str) -> Path:
    path.write_text(text + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def site(tiny_model_dir: Path, site_data_dir: Path, tmp_path: Path) -> tuple[Path, NodeConfig]:
    data = tmp_path / "data"
    shutil.copytree(site_data_dir, data)
    config = NodeConfig(
        name="site-a",
        model_dir=str(tiny_model_dir),
        data_dir=str(data),
        state_dir=str(tmp_path / "state"),
        pki_dir=str(tmp_path / "unused-pki"),
        kek={"passphrase_file": str(_passphrase(tmp_path / "kek.pass", "a long site passphrase for tests"))},
    )
    return cfg.save(config, tmp_path / "node.json"), config


def fedseek(*argv: str) -> str:
    """The operator's `fedseek` command, in a process of its own."""
    done = subprocess.run(
        [sys.executable, "-m", "federation.cli.main", *argv], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def _records(layout: NodeLayout) -> list[AuditRecord]:
    return [record for record, _ in scan(layout.audit)]


def _start_refused(config: NodeConfig) -> str:
    with pytest.raises(NodeStartError) as refused:
        build_node(config)
    message = refused.value.one_line()
    assert "\n" not in str(refused.value)
    return message


def test_a_node_with_a_kek_keeps_everything_encrypted_restarts_and_refuses_without_it(
    site: tuple[Path, NodeConfig], tiny_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config_file, config = site
    layout = NodeLayout(Path(config.state_dir))
    data = Path(config.data_dir)
    arrays = adapter_arrays(tiny_model_dir, seed=1)
    with caplog.at_level(logging.WARNING, logger="fedseek.node"):
        first = build_node(config)
    assert "site data in clear at a site with a KEK: train.jsonl, eval.jsonl" in caplog.text  # not yet migrated
    try:
        first.deploy("v1", wire.sha256_of(arrays), arrays)
        fingerprints = first.ledger.chain().fingerprints()
    finally:
        first.serving.close()
    stored = layout.adapters / "v1" / "adapter.safetensors.enc"
    assert stored.read_bytes().startswith(MAGIC) and not (layout.adapters / "v1" / "adapter.safetensors").exists()
    assert wire.encode(arrays)[:64] not in stored.read_bytes()  # the safetensors header is not in clear
    assert json.loads(layout.kek.read_text())["id"] == header_kek_id(stored)

    # the training and eval data, encrypted in place by the operator (the node stopped)
    fedseek("keys", "encrypt", "--config", str(config_file))
    assert sorted(p.name for p in data.glob("*.jsonl*")) == ["eval.jsonl.enc", "train.jsonl.enc"]
    assert b"assistant" not in (data / "train.jsonl.enc").read_bytes()

    second = build_node(config)  # restarted: reads the encrypted data and adapter
    try:
        assert second.host.adapters["v1"].sha256 == wire.sha256_of(arrays)
        assert "v1" in [m["id"] for m in second.models()]
        # the partition is fingerprinted by its plaintext: encrypting it did not make it a new partition
        assert isinstance(second.train_data, SiteData) and second.train_data.fingerprints == fingerprints
        assert not [r for r in _records(layout) if r.action == "data.unregistered"]
    finally:
        second.serving.close()

    # without the KEK: refused, one line naming an encrypted file
    message = _start_refused(NodeConfig(**{**cfg.to_json(config), "kek": {}}))
    assert ".enc" in message and "no KEK configured" in message

    # a wrong passphrase: refused before any file is read
    wrong = _passphrase(Path(config.state_dir).parent / "wrong.pass", "another long passphrase")
    message = _start_refused(NodeConfig(**{**cfg.to_json(config), "kek": {"passphrase_file": str(wrong)}}))
    assert "this site's files are under KEK" in message

    # an adapter altered on disk: refused, naming the file
    blob = bytearray(stored.read_bytes())
    original = bytes(blob)
    blob[len(blob) // 2] ^= 0x01
    stored.write_bytes(bytes(blob))
    message = _start_refused(config)
    assert str(stored) in message and "altered" in message
    stored.write_bytes(original)
    # the refusal is audited, its message (free text) sealed under the KEK; the log verifies without it
    refusal = [r for r in _records(layout) if r.action == "at_rest.refused"][-1]
    assert "error" not in refusal.details and SEALED in refusal.details
    envelope = site_envelope(config.kek, layout.kek)
    assert envelope is not None
    assert PayloadSealer(envelope, layout.audit_payload_keys).open(refusal)["error"] == message
    assert verify(layout.audit).ok

    # adapter.json pointed at other weights: the ciphertext is bound to its sha256, refused
    meta_path = layout.adapters / "v1" / "adapter.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "sha256": "0" * 64}))
    assert str(stored) in _start_refused(config)
    meta_path.write_text(json.dumps(meta))


def test_rotation_rewraps_every_file_updates_the_config_and_retires_the_old_kek(
    site: tuple[Path, NodeConfig], tiny_model_dir: Path
) -> None:
    config_file, config = site
    layout = NodeLayout(Path(config.state_dir))
    arrays = adapter_arrays(tiny_model_dir, seed=2)
    node = build_node(config)
    try:
        node.deploy("v1", wire.sha256_of(arrays), arrays)
    finally:
        node.serving.close()
    fedseek("keys", "encrypt", "--config", str(config_file))
    files = encrypted_files(Path(config.data_dir), layout.root)
    expected = [*Path(config.data_dir).glob("*.enc"), layout.adapters / "v1" / "adapter.safetensors.enc"]
    assert set(expected) < set(files)  # and the audit trail's payload keys
    assert any(p.parent == layout.audit_payload_keys for p in files)
    bodies = {p: p.read_bytes()[body_offset(p) :] for p in files}
    old_id = json.loads(layout.kek.read_text())["id"]

    new_key = secrets.token_hex(32)
    command = f"{sys.executable} -c 'print(\"{new_key}\")'"  # a KMS client stand-in: a real external command
    layout.endpoints.write_text(json.dumps({"pid": os.getpid()}))  # a live node: refused, nothing touched
    argv = ["keys", "rotate", "--config", str(config_file), "--new-command", command]
    refused = subprocess.run(
        [sys.executable, "-m", "federation.cli.main", *argv],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert refused.returncode == 2 and "the node is running" in refused.stderr
    assert all(header_kek_id(p) == old_id for p in files)
    layout.endpoints.unlink()
    fedseek("keys", "rotate", "--config", str(config_file), "--new-command", command)
    rotated = cfg.load(cfg.NodeConfig, config_file)
    assert rotated.kek == {"command": [sys.executable, "-c", f'print("{new_key}")']}
    new_id = json.loads(layout.kek.read_text())["id"]
    assert new_id != old_id and json.loads(layout.kek.read_text())["previous"] == [old_id]
    for path in files:
        assert header_kek_id(path) == new_id
        assert path.read_bytes()[body_offset(path) :] == bodies[path]  # only the wrapped key changed
    status = json.loads(fedseek("keys", "status", "--config", str(config_file), "--json"))  # needs no key
    assert status["encrypted"] == {new_id: len(files)} and status["in_clear"] == []
    rotation = [r for r in _records(layout) if r.action == "kek.rotated"]
    assert rotation and rotation[-1].details["to"] == new_id and rotation[-1].details["rewrapped"] == len(files)

    restarted = build_node(rotated)  # the new KEK opens everything
    try:
        assert restarted.host.adapters["v1"].sha256 == wire.sha256_of(arrays)
    finally:
        restarted.serving.close()
    message = _start_refused(config)  # the old passphrase no longer opens the site
    assert f"this site's files are under KEK {new_id}" in message


def test_explanations_seal_under_the_kek_and_old_site_key_seals_still_open() -> None:
    envelope = Envelope(CommandKek([sys.executable, "-c", f"print({secrets.token_hex(32)!r})"]))
    plain = SiteKeys.ephemeral()
    keys = plain.with_envelope(envelope)
    old = plain.seal(b"Kussmaul breathing", label="expl-1/json")
    new = keys.seal(b"Kussmaul breathing", label="expl-1/json")
    assert new.startswith(MAGIC) and b"Kussmaul" not in new
    assert keys.unseal(new, label="expl-1/json") == keys.unseal(old, label="expl-1/json") == b"Kussmaul breathing"
    with pytest.raises(SealError, match="sealed under a KEK"):
        plain.unseal(new, label="expl-1/json")  # the site key alone does not open it
    with pytest.raises(Exception, match="moved"):
        keys.unseal(new, label="expl-2/json")  # bound to its explanation
