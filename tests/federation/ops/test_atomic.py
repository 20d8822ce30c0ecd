"""Crash-safe writes: a reader sees the old or the new content, never a partial file or directory."""

from __future__ import annotations

import os
import shutil
import stat
import threading
from pathlib import Path

import pytest

from federation.ops import atomic
from federation.ops.atomic import exchange, install_dir, private_dir, write_atomic


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _make_dir(path: Path, files: dict[str, str]) -> Path:
    path.mkdir()
    for name, text in files.items():
        (path / name).write_text(text)
    return path


def _contents(path: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(path.iterdir())}


# --------------------------------------------------------------------------
# write_atomic
# --------------------------------------------------------------------------


def test_write_creates_the_file_and_leaves_nothing_else(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    write_atomic(target, "héllo")  # str is written as UTF-8
    assert target.read_bytes() == "héllo".encode()
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


@pytest.mark.parametrize("mode", [0o600, 0o644, 0o640])
def test_mode_is_applied_whatever_the_umask(tmp_path: Path, mode: int) -> None:
    old_umask = os.umask(0o077)
    try:
        write_atomic(tmp_path / "f", b"x", mode=mode)
    finally:
        os.umask(old_umask)
    assert _mode(tmp_path / "f") == mode


def test_replacing_a_file_replaces_its_mode_too(tmp_path: Path) -> None:
    """A secret rewritten over a world-readable file must not inherit the old mode."""
    target = tmp_path / "key.pem"
    target.write_bytes(b"old")
    target.chmod(0o644)
    write_atomic(target, b"secret", mode=0o600)
    assert target.read_bytes() == b"secret"
    assert _mode(target) == 0o600


def test_a_failed_rename_keeps_the_old_content_and_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "state.json"
    target.write_text("old")

    def broken_replace(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="No space left"):
        write_atomic(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_a_failure_while_writing_keeps_the_old_content(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "state.json"
    target.write_text("old")

    def broken_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="Input/output error"):
        write_atomic(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_the_directory_is_synced_after_the_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the directory fsync a crash could undo the rename, losing a write already reported done."""
    target = tmp_path / "state.json"
    synced: list[tuple[Path, str]] = []
    monkeypatch.setattr(atomic, "fsync_dir", lambda path: synced.append((path, target.read_text())))
    write_atomic(target, "new")
    assert synced == [(tmp_path, "new")]


def test_a_missing_directory_is_an_error_not_created(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        write_atomic(tmp_path / "absent" / "f", b"x")
    assert not (tmp_path / "absent").exists()


# --------------------------------------------------------------------------
# install_dir
# --------------------------------------------------------------------------


def test_install_into_an_empty_place(tmp_path: Path) -> None:
    staging = _make_dir(tmp_path / ".new", {"a": "1"})
    install_dir(staging, tmp_path / "dest")
    assert _contents(tmp_path / "dest") == {"a": "1"}
    assert not staging.exists()


def test_install_swaps_a_non_empty_directory(tmp_path: Path) -> None:
    dest = _make_dir(tmp_path / "dest", {"old": "1", "shared": "old"})
    staging = _make_dir(tmp_path / ".new", {"shared": "new", "fresh": "2"})
    install_dir(staging, dest)
    assert _contents(dest) == {"fresh": "2", "shared": "new"}
    # With RENAME_EXCHANGE the old directory is handed back in `staging` for the caller to delete.
    if staging.exists():
        assert _contents(staging) == {"old": "1", "shared": "old"}
    assert {p.name for p in tmp_path.iterdir()} <= {"dest", ".new"}


def test_fallback_without_exchange_replaces_and_cleans_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(atomic, "exchange", lambda a, b: False)
    dest = _make_dir(tmp_path / "dest", {"old": "1"})
    staging = _make_dir(tmp_path / ".new", {"new": "2"})
    install_dir(staging, dest)
    assert _contents(dest) == {"new": "2"}
    assert [p.name for p in tmp_path.iterdir()] == ["dest"]  # the moved-aside old directory is gone


def test_fallback_restores_the_old_directory_when_the_second_rename_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(atomic, "exchange", lambda a, b: False)
    dest = _make_dir(tmp_path / "dest", {"old": "1"})
    staging = _make_dir(tmp_path / ".new", {"new": "2"})
    real_rename = os.rename

    def rename(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        if Path(src) == staging:
            raise OSError(28, "No space left on device")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="No space left"):
        install_dir(staging, dest)
    assert _contents(dest) == {"old": "1"}
    assert {p.name for p in tmp_path.iterdir()} == {"dest", ".new"}  # staging is the caller's to delete


def test_a_symlink_in_place_is_replaced_not_followed(tmp_path: Path) -> None:
    elsewhere = _make_dir(tmp_path / "elsewhere", {"keep": "me"})
    dest = tmp_path / "dest"
    dest.symlink_to(elsewhere, target_is_directory=True)
    install_dir(_make_dir(tmp_path / ".new", {"new": "2"}), dest)
    assert not dest.is_symlink()
    assert _contents(dest) == {"new": "2"}
    assert _contents(elsewhere) == {"keep": "me"}


def test_readers_never_see_the_directory_missing(tmp_path: Path) -> None:
    """The point of RENAME_EXCHANGE: a party re-reading its files mid-renewal always finds them.

    (With the two-rename fallback this fails most runs: the reader hits the moment with no directory.)
    """
    probe_a, probe_b = _make_dir(tmp_path / "pa", {}), _make_dir(tmp_path / "pb", {})
    if not exchange(probe_a, probe_b):
        pytest.skip("this filesystem cannot exchange directories")
    dest = _make_dir(tmp_path / "dest", {"cert": "0", "key": "0"})
    stop = threading.Event()
    gaps: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            try:
                os.stat(dest / "cert")
            except FileNotFoundError as exc:
                gaps.append(str(exc))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for generation in range(1, 301):
            staging = _make_dir(tmp_path / f".new-{generation}", {"cert": str(generation), "key": str(generation)})
            install_dir(staging, dest)
            shutil.rmtree(staging)  # the swapped-out old generation
    finally:
        stop.set()
        thread.join()
    assert gaps == []
    assert _contents(dest) == {"cert": "300", "key": "300"}


# private by default (finding 9 of issue 13; the daemons' state: tests/redteam/test_state_permissions.py)
def test_write_atomic_is_owner_only_unless_told(tmp_path: Path) -> None:
    write_atomic(tmp_path / "state", "x")
    write_atomic(tmp_path / "cert.pem", "x", mode=0o644)  # public PKI files ask for it
    assert (tmp_path / "state").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "cert.pem").stat().st_mode & 0o777 == 0o644


def test_private_dir_makes_or_tightens_to_0700(tmp_path: Path) -> None:
    made = private_dir(tmp_path / "new" / "state")
    loose = tmp_path / "loose"
    loose.mkdir()
    loose.chmod(0o755)
    private_dir(loose)
    assert made.stat().st_mode & 0o777 == 0o700 and loose.stat().st_mode & 0o777 == 0o700


def test_ensure_secret_makes_a_private_file_once(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    made = [b"first", b"second"]
    first = atomic.ensure_secret(path, lambda: made.pop(0))
    again = atomic.ensure_secret(path, lambda: made.pop(0))
    assert first == again == b"first" == path.read_bytes()
    assert made == [b"second"]  # the second call made nothing
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
