"""privacy.audit_payload: sensitive audit fields sealed under the site's KEK; the log verifies without it."""

from __future__ import annotations

import dataclasses
import re
import secrets
import sys
from pathlib import Path

import pytest

from federation.security.at_rest import AtRestError, CommandKek, Envelope, TamperedFile, encrypted_files
from privacy.audit import scan, verify
from privacy.audit_payload import SEALED, PayloadSealer, PayloadSealingTrail, payload_keys_dir


def _envelope() -> Envelope:
    return Envelope(CommandKek([sys.executable, "-c", f"print({secrets.token_hex(32)!r})"]))


def test_sensitive_fields_are_sealed_and_the_log_verifies_without_the_key(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    envelope = _envelope()
    sealer = PayloadSealer(envelope, payload_keys_dir(log))
    trail = PayloadSealingTrail(log, payload=sealer)
    try:
        details = {"error": "train.jsonl line 7: patient 4711, Kussmaul breathing", "sha256": "abc", "records": 3}
        record = trail.append(actor="node", action="data.refused", resource="site-a", details=details)
        plain = trail.append(actor="node", action="deploy", resource="v1", details={"sha256": "def"})
    finally:
        trail.close()
    text = log.read_text()
    assert "Kussmaul" not in text and "4711" not in text
    assert record.details["sha256"] == "abc" and record.details["records"] == 3 and SEALED in record.details
    assert plain.details == {"sha256": "def"}  # nothing sensitive: left as it was
    assert verify(log).ok  # the chain and tree are over the ciphertext: no key needed
    stored = [r for r, _ in scan(log)]
    assert sealer.open(stored[0]) == details
    assert PayloadSealer(envelope, payload_keys_dir(log)).open(stored[0]) == details  # a fresh process
    with pytest.raises(AtRestError, match=re.escape(str(payload_keys_dir(log)))):
        PayloadSealer(_envelope(), payload_keys_dir(log)).open(stored[0])  # another KEK
    with pytest.raises(TamperedFile, match="altered or moved"):
        sealer.open(dataclasses.replace(stored[0], resource="site-b"))  # the blob is bound to its record


def test_month_keys_are_rewrapped_by_rotation_and_deleting_one_erases_its_fields(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    old = _envelope()
    trail = PayloadSealingTrail(log, payload=PayloadSealer(old, payload_keys_dir(log)))
    try:
        trail.append(actor="operator", action="ledger.partition.refused", details={"note": "batch from ward 7"})
    finally:
        trail.close()
    keys = encrypted_files(tmp_path)
    assert [p.parent for p in keys] == [payload_keys_dir(log)]  # found by `fedseek keys rotate`
    new = Envelope(CommandKek([sys.executable, "-c", f"print({secrets.token_hex(32)!r})"]), older=[old.source])
    assert new.rewrap(keys[0])
    record = next(r for r, _ in scan(log))
    assert PayloadSealer(Envelope(new.source), payload_keys_dir(log)).open(record)["note"] == "batch from ward 7"
    keys[0].unlink()  # crypto-shredding a month
    with pytest.raises(TamperedFile, match="erased"):
        PayloadSealer(Envelope(new.source), payload_keys_dir(log)).open(record)
    assert verify(log).ok
