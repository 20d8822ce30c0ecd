"""Encrypted training data (node.data): read transparently, fingerprinted by its plaintext."""

from __future__ import annotations

import json
import secrets
import sys
from pathlib import Path

import pytest

from federation.security.at_rest import CommandKek, Envelope, TamperedFile, WrongKek
from node.data import DataError, load_jsonl, partition_files, read_partition

RECORD = {"messages": [{"role": "user", "content": "Chest pain?"}, {"role": "assistant", "content": "Cardiology"}]}


@pytest.fixture
def envelope() -> Envelope:
    return Envelope(CommandKek([sys.executable, "-c", f"print({secrets.token_hex(32)!r})"]))


def test_an_encrypted_batch_has_the_fingerprint_of_its_plaintext(tmp_path: Path, envelope: Envelope) -> None:
    batches = tmp_path / "train"
    batches.mkdir()
    plain = batches / "2025-07.jsonl"
    plain.write_text(json.dumps(RECORD) + "\n")
    envelope.encrypt_file(plain, batches / "2025-08.jsonl.enc", context="data")
    (batches / "notes.txt").write_text("not a batch")
    assert partition_files(tmp_path) == [plain, batches / "2025-08.jsonl.enc"]
    # the same bytes, encrypted: one partition to the ledger, never a new one with a fresh budget
    assert read_partition(batches / "2025-08.jsonl.enc", envelope=envelope) == read_partition(plain)
    with pytest.raises(WrongKek, match=r"2025-08\.jsonl\.enc: encrypted, and this site has no KEK"):
        read_partition(batches / "2025-08.jsonl.enc")


def test_single_file_layouts_and_eval_may_be_encrypted(tmp_path: Path, envelope: Envelope) -> None:
    for name in ("train.jsonl", "eval.jsonl"):
        envelope.write(tmp_path / f"{name}.enc", (json.dumps(RECORD) + "\n").encode(), context="data")
    assert partition_files(tmp_path) == [tmp_path / "train.jsonl.enc"]
    assert load_jsonl(tmp_path / "eval.jsonl", envelope=envelope)[0].answer == "Cardiology"
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match="keep one layout"):
        partition_files(tmp_path)
    blob = bytearray((tmp_path / "eval.jsonl.enc").read_bytes())
    blob[-1] ^= 1
    (tmp_path / "eval.jsonl.enc").write_bytes(bytes(blob))
    with pytest.raises(TamperedFile, match=r"eval\.jsonl\.enc"):
        load_jsonl(tmp_path / "eval.jsonl", envelope=envelope)
