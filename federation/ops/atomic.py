"""Crash-safe file writes: a reader sees the old or the new content, never a partial file.

`write_atomic` writes a temporary file in the same directory, fsyncs it, renames it over the
target and fsyncs the directory; `install_dir` does the same for a whole directory (one
`renameat2(RENAME_EXCHANGE)` where Linux offers it). Every FedSeek state file goes through here.

State is private by default: `write_atomic` makes files 0600 unless told otherwise (only the
PKI's public certificates, CRLs and public keys ask for 0644), `private_dir` makes or tightens
a state directory to 0700, and the daemons run under `PRIVATE_UMASK`, so what they and their
children (SuperLink, SuperNode, nginx, stunnel) create is readable by their user alone: audit
trails, ledgers, adapters, explanations and logs hold a site's clinical traces.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = ["PRIVATE_UMASK", "ensure_secret", "exchange", "fsync_dir", "install_dir", "private_dir", "write_atomic"]

PRIVATE_UMASK = 0o077
"""The daemons' umask (`os.umask(PRIVATE_UMASK)` at start): new files 0600, new directories 0700."""


def private_dir(path: Path) -> Path:
    """`path` as a directory only its owner can enter: made 0700 (parents too), or tightened to
    0700 if it was there already (a state directory an operator made with a looser mode)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.stat().st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


def ensure_secret(path: Path, make: Callable[[], bytes]) -> bytes:
    """The secret in `path`, made with `make()` (0600) on first use. The file is created exclusively,
    so two processes starting at once cannot each write their own: the loser reads the winner's."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_bytes()
    secret = make()
    try:  # first use: this process made the file, no other can be writing it
        os.write(fd, secret)
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(path.parent)
    return secret


@contextlib.contextmanager
def atomic_writer(path: Path, *, mode: int = 0o600, suffix: str = ".tmp") -> Iterator[BinaryIO]:
    """A binary file that appears at `path` whole or not at all: written to a temp file beside it
    (mode set before the first byte), fsynced, renamed over `path`, the directory fsynced; on any
    error the temp file is removed and `path` is untouched."""
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), mode)
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    fsync_dir(path.parent)


def write_atomic(path: Path, data: bytes | str, *, mode: int = 0o600) -> None:
    """Write via temp file + fsync + rename so readers never see a partial file."""
    with atomic_writer(path, mode=mode) as fh:
        fh.write(data.encode("utf-8") if isinstance(data, str) else data)


def install_dir(staging: Path, dest: Path) -> None:
    """Move a fully written directory into place, replacing any previous one.

    Where the kernel can (Linux renameat2 RENAME_EXCHANGE) the two swap in one
    step, so a party re-reading its files during a renewal sees the old or the
    new directory, never none; ``staging`` then holds the old one, for the
    caller to delete. Elsewhere (POSIX cannot rename over a non-empty
    directory) the old one is moved aside first and restored if the second
    rename fails.
    """
    if dest.is_dir() and not dest.is_symlink() and exchange(staging, dest):
        fsync_dir(dest.parent)
        return
    old: Path | None = None
    if dest.exists() or dest.is_symlink():
        old = dest.parent / f".{dest.name}.old-{secrets.token_hex(4)}"
        os.rename(dest, old)
    try:
        os.rename(staging, dest)
    except BaseException:
        if old is not None:
            os.rename(old, dest)
        raise
    fsync_dir(dest.parent)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                old.unlink()


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


@functools.cache
def _renameat2() -> Callable[..., int] | None:
    try:
        func = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    func.restype = ctypes.c_int
    result: Callable[..., int] = func
    return result


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths; False where the platform or filesystem cannot."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def fsync_dir(path: Path) -> None:
    """Make a rename or a file creation in directory `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
