"""federation.security.at_rest: AES-256-GCM envelopes under a site KEK from a passphrase file or a command."""

from __future__ import annotations

import io
import os
import re
import secrets
import sys
from pathlib import Path

import pytest

from federation.security.at_rest import (
    AtRestError,
    CommandKek,
    Envelope,
    KekError,
    PassphraseKek,
    TamperedFile,
    WrongKek,
    body_offset,
    encrypted_files,
    header_kek_id,
    read_kek_state,
    site_envelope,
)


def _command(key_hex: str) -> list[str]:
    """A KMS stand-in: a real external process that prints the key."""
    return [sys.executable, "-c", f"print({key_hex!r})"]


def _passphrase(path: Path, text: str = "correct horse battery staple") -> Path:
    path.write_text(text + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def envelope() -> Envelope:
    return Envelope(CommandKek(_command(secrets.token_hex(32))))


def test_round_trip_of_every_size_around_a_chunk_boundary(envelope: Envelope) -> None:
    for size in (0, 1, 63, 64, 65, 128, 200):
        data = os.urandom(size)
        out = io.BytesIO()
        envelope.encrypt_stream(io.BytesIO(data), out, context="ctx", chunk=64)
        back = io.BytesIO()
        envelope.decrypt_stream(io.BytesIO(out.getvalue()), back, name="f", context="ctx")
        assert back.getvalue() == data


def test_the_plaintext_is_not_in_the_file(tmp_path: Path, envelope: Envelope) -> None:
    secret = b"Kussmaul breathing, patient 4711 " * 100
    envelope.write(tmp_path / "x.enc", secret)
    blob = (tmp_path / "x.enc").read_bytes()
    assert b"Kussmaul" not in blob and b"4711" not in blob
    assert (tmp_path / "x.enc").stat().st_mode & 0o777 == 0o600
    assert envelope.read(tmp_path / "x.enc") == secret


def test_every_byte_flip_in_header_or_body_is_refused_naming_the_file(tmp_path: Path, envelope: Envelope) -> None:
    out = io.BytesIO()
    envelope.encrypt_stream(io.BytesIO(os.urandom(200)), out, context="adapter/v1", chunk=64)
    blob = out.getvalue()
    path = tmp_path / "adapter.safetensors.enc"
    for i in range(len(blob)):
        for bit in (0x01, 0x80):
            altered = bytearray(blob)
            altered[i] ^= bit
            path.write_bytes(bytes(altered))
            with pytest.raises(AtRestError, match=re.escape(str(path))):
                envelope.read(path, context="adapter/v1")


def test_truncation_at_any_point_and_appended_bytes_are_refused(tmp_path: Path, envelope: Envelope) -> None:
    out = io.BytesIO()
    envelope.encrypt_stream(io.BytesIO(os.urandom(300)), out, chunk=64)
    blob = out.getvalue()
    path = tmp_path / "data.jsonl.enc"
    for cut in range(len(blob)):  # every prefix, chunk boundaries included
        path.write_bytes(blob[:cut])
        with pytest.raises(AtRestError, match=re.escape(str(path))):
            envelope.read(path)
    for extra in (b"\x00", os.urandom(80)):
        path.write_bytes(blob + extra)
        with pytest.raises(TamperedFile, match=re.escape(str(path))):
            envelope.read(path)


def test_chunks_swapped_or_the_file_moved_to_another_context_are_refused(tmp_path: Path, envelope: Envelope) -> None:
    out = io.BytesIO()
    envelope.encrypt_stream(io.BytesIO(b"a" * 64 + b"b" * 64 + b"c" * 10), out, context="adapter/v1", chunk=64)
    blob = out.getvalue()
    start, step = len(blob) - (2 * 80 + 26), 80
    swapped = (
        blob[:start] + blob[start + step : start + 2 * step] + blob[start : start + step] + blob[start + 2 * step :]
    )
    with pytest.raises(TamperedFile, match="chunk 0"):
        envelope.decrypt_bytes(swapped, name="f", context="adapter/v1")
    with pytest.raises(TamperedFile, match="moved"):
        envelope.decrypt_bytes(blob, name="f", context="adapter/v2")


def test_another_kek_cannot_read_it(tmp_path: Path, envelope: Envelope) -> None:
    envelope.write(tmp_path / "x.enc", b"secret")
    other = Envelope(CommandKek(_command(secrets.token_hex(32))))
    with pytest.raises(WrongKek, match=re.escape(f"{tmp_path / 'x.enc'}: encrypted under KEK {envelope.kek_id}")):
        other.read(tmp_path / "x.enc")
    with pytest.raises(TamperedFile, match="not a FedSeek encrypted file"):
        envelope.decrypt_bytes(b'{"plain": "json"}', name="plain.json")


def test_passphrase_kek_round_trips_and_a_wrong_passphrase_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "kek.json"
    spec = {"passphrase_file": str(_passphrase(tmp_path / "pass"))}
    first = site_envelope(spec, state)
    assert first is not None and read_kek_state(state)["id"] == first.kek_id  # type: ignore[index]
    first.write(tmp_path / "x.enc", b"secret")
    again = site_envelope(spec, state)  # the next start: same salt, same KEK
    assert again is not None and again.kek_id == first.kek_id
    assert again.read(tmp_path / "x.enc") == b"secret"
    wrong = {"passphrase_file": str(_passphrase(tmp_path / "wrong", "another long passphrase"))}
    with pytest.raises(WrongKek, match=f"this site's files are under KEK {first.kek_id}"):
        site_envelope(wrong, state)
    state.unlink()  # kek.json lost: a file's own header still names the salt, the wrong key still fails
    lost = site_envelope(wrong, state)
    assert lost is not None
    with pytest.raises(WrongKek, match=re.escape(str(tmp_path / "x.enc"))):
        lost.read(tmp_path / "x.enc")
    state.unlink()
    assert site_envelope(spec, state).read(tmp_path / "x.enc") == b"secret"  # type: ignore[union-attr]


def test_a_passphrase_file_others_can_read_or_a_short_one_is_refused(tmp_path: Path) -> None:
    loose = _passphrase(tmp_path / "loose")
    loose.chmod(0o644)
    with pytest.raises(KekError, match="readable by others"):
        PassphraseKek(loose).kek(b"s" * 16)
    with pytest.raises(KekError, match="shorter than"):
        PassphraseKek(_passphrase(tmp_path / "short", "abc")).kek(b"s" * 16)
    with pytest.raises(KekError, match="cannot read"):
        PassphraseKek(tmp_path / "missing").kek(b"s" * 16)


def test_command_kek_accepts_hex_or_base64_and_reports_a_failing_command(tmp_path: Path) -> None:
    import base64

    key = secrets.token_bytes(32)
    by_hex = Envelope(CommandKek(_command(key.hex())))
    by_b64 = Envelope(CommandKek(_command(base64.b64encode(key).decode())))
    assert by_hex.kek_id == by_b64.kek_id
    with pytest.raises(KekError, match="exited 3: kms unreachable"):
        CommandKek([sys.executable, "-c", "import sys; sys.stderr.write('kms unreachable\\n'); sys.exit(3)"]).kek(b"")
    with pytest.raises(KekError, match="printed no 32-byte key"):
        CommandKek(_command("abcd")).kek(b"")


def test_rotation_rewraps_keys_without_touching_ciphertext_bodies(tmp_path: Path) -> None:
    old_source = PassphraseKek(_passphrase(tmp_path / "old"))
    old = Envelope(old_source, salt=os.urandom(16))
    (tmp_path / "adapters" / "v1").mkdir(parents=True)
    files = [tmp_path / "adapters" / "v1" / "adapter.safetensors.enc", tmp_path / "train.jsonl.enc"]
    for i, path in enumerate(files):
        old.write(path, os.urandom(150_000 + i), context=f"c{i}")
    (tmp_path / "plain.json").write_text("{}")
    assert encrypted_files(tmp_path) == sorted(files)
    bodies = {p: p.read_bytes()[body_offset(p) :] for p in files}
    new = Envelope(CommandKek(_command(secrets.token_hex(32))), older=[old_source])
    assert [new.rewrap(p) for p in files] == [True, True]
    assert [new.rewrap(p) for p in files] == [False, False]  # a second run (after a crash) skips them
    for i, path in enumerate(files):
        assert header_kek_id(path) == new.kek_id
        assert path.read_bytes()[body_offset(path) :] == bodies[path]  # the data was not rewritten
        assert Envelope(new.source).read(path, context=f"c{i}")  # the new KEK alone opens it
        with pytest.raises(WrongKek, match=re.escape(str(path))):
            old.read(path, context=f"c{i}")  # and the old one no longer does
