"""Tests for the SuperNode authentication key pair (EC P-384, OpenSSH format)."""

from __future__ import annotations

import stat
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from federation.security.flower_auth import auth_key_paths, ensure_auth_keypair


def test_creates_both_files_in_a_new_directory(tmp_path: Path) -> None:
    directory = tmp_path / "state" / "flower"
    pair = ensure_auth_keypair(directory)
    assert pair == auth_key_paths(directory)
    assert pair.private_key.is_file()
    assert pair.public_key.is_file()
    assert sorted(p.name for p in directory.iterdir()) == ["supernode_auth.key", "supernode_auth.pub"]


def test_private_key_is_owner_only(tmp_path: Path) -> None:
    pair = ensure_auth_keypair(tmp_path)
    assert stat.S_IMODE(pair.private_key.stat().st_mode) == 0o600


def test_key_pair_is_created_once_and_reused(tmp_path: Path) -> None:
    pair = ensure_auth_keypair(tmp_path)
    private, public = pair.private_key.read_bytes(), pair.public_key.read_bytes()
    again = ensure_auth_keypair(tmp_path)
    assert again == pair
    assert again.private_key.read_bytes() == private
    assert again.public_key.read_bytes() == public


def test_separate_directories_get_different_keys(tmp_path: Path) -> None:
    a = ensure_auth_keypair(tmp_path / "a")
    b = ensure_auth_keypair(tmp_path / "b")
    assert a.public_key.read_bytes() != b.public_key.read_bytes()


def test_half_present_pair_is_regenerated_consistently(tmp_path: Path) -> None:
    pair = ensure_auth_keypair(tmp_path)
    old_public = pair.public_key.read_bytes()
    pair.public_key.unlink()
    ensure_auth_keypair(tmp_path)
    private = serialization.load_ssh_private_key(pair.private_key.read_bytes(), password=None)
    public = serialization.load_ssh_public_key(pair.public_key.read_bytes())
    assert public.public_numbers() == private.public_key().public_numbers()  # type: ignore[union-attr]
    assert pair.public_key.read_bytes() != old_public


def test_public_key_is_openssh_secp384r1(tmp_path: Path) -> None:
    pair = ensure_auth_keypair(tmp_path)
    text = pair.public_key.read_bytes()
    assert text.startswith(b"ecdsa-sha2-nistp384 ")
    public = serialization.load_ssh_public_key(text)
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert isinstance(public.curve, ec.SECP384R1)


def test_private_key_is_openssh_and_matches_public_key(tmp_path: Path) -> None:
    pair = ensure_auth_keypair(tmp_path)
    raw = pair.private_key.read_bytes()
    assert raw.startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    private = serialization.load_ssh_private_key(raw, password=None)
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert isinstance(private.curve, ec.SECP384R1)
    public = serialization.load_ssh_public_key(pair.public_key.read_bytes())
    assert isinstance(public, ec.EllipticCurvePublicKey)
    # a signature made with the private key verifies under the published public key
    signature = private.sign(b"fedseek", ec.ECDSA(hashes.SHA384()))
    public.verify(signature, b"fedseek", ec.ECDSA(hashes.SHA384()))


def test_no_temporary_file_is_left_behind(tmp_path: Path) -> None:
    ensure_auth_keypair(tmp_path)
    assert not list(tmp_path.glob("*.tmp"))
