"""Encryption at rest: AES-256-GCM envelopes under the site's key-encryption key (KEK).

Every encrypted file has its own random 256-bit data key; the data key is stored in the file's
header, wrapped (AES-256-GCM) by the site's KEK. The KEK is never a file in the state directory:
it is derived (scrypt) from a passphrase file the operator keeps elsewhere, or printed by an
external command (a KMS or HSM client), as `NodeConfig.kek` says:

    {"passphrase_file": "/etc/fedseek/site-a.pass"}     scrypt(passphrase, salt), n=2^15, r=8, p=1
    {"command": ["kms-unwrap", "--key", "site-a"]}     stdout: 32 bytes as 64 hex digits or base64

A KEK is known by its id, the first 8 bytes of HKDF-SHA256(KEK, "fedseek kek id v1") in hex: one
way, so the id tells which key a file needs without telling anything about the key.

File format (version 1; integers big-endian):

    data header   magic "FSE1" | version 1 | chunk size u32 | nonce prefix (7 random bytes)
    key header    KEK id (8) | salt length u8 | salt (0 or 16) | wrap nonce (12) | wrapped data key (48)
    body          chunks: AES-256-GCM(data key, nonce = prefix | chunk index u32 | last-chunk flag u8,
                  aad = data header | context), each `chunk size` bytes of plaintext + a 16-byte tag

The wrapped data key's associated data is the data header and the key header before it, so no
header byte can change unnoticed; each chunk is bound to the data header, its index and whether it
is the last (the STREAM construction), so a reordered, dropped or cut-off chunk fails to open;
and `context` (what the file is: "adapter/<version>/<sha256>", an explanation's id) binds a file to
its place, so a ciphertext moved to another name does not open either. Memory stays at one chunk.

Key rotation (`rewrap`) unwraps the data key with the old KEK and wraps it with the new one: only
the key header changes; the body's bytes are copied as they are (never decrypted), into a new file
renamed over the old one, so a crash leaves either the old or the new file whole.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import json
import os
import stat
import struct
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from federation.errors import InvalidInput, Unavailable
from federation.ops.atomic import atomic_writer, write_atomic

__all__ = [
    "CHUNK_BYTES",
    "MAGIC",
    "AtRestError",
    "CommandKek",
    "Envelope",
    "Kek",
    "KekError",
    "KekSource",
    "PassphraseKek",
    "TamperedFile",
    "WrongKek",
    "encrypted_files",
    "is_encrypted",
    "kek_source",
    "read_kek_state",
    "site_envelope",
    "write_kek_state",
]

MAGIC = b"FSE1"
VERSION = 1
CHUNK_BYTES = 64 * 1024
KEY_BYTES = 32
SALT_BYTES = 16
_ID_BYTES = 8
_PREFIX_BYTES = 7
_NONCE_BYTES = 12
_TAG_BYTES = 16
_DATA_HEADER = struct.Struct(">4sBI7s")  # magic, version, chunk size, nonce prefix
_WRAPPED_BYTES = KEY_BYTES + _TAG_BYTES
# scrypt at 2^15 x 8: 32 MiB and about 0.1 s per derivation on one core (once per process and salt)
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**15, 8, 1
MIN_PASSPHRASE = 12
KEK_STATE_FORMAT = "fedseek-kek/1"


class AtRestError(Unavailable):
    """An encrypted file this site cannot open: the resource is unavailable until the operator acts."""


class KekError(AtRestError):
    """The configured KEK cannot be had: passphrase file or command missing, failing or malformed."""


class WrongKek(AtRestError):
    """A file wrapped under another KEK than the ones configured (or the site has none)."""


class TamperedFile(AtRestError):
    """An encrypted file whose header or body was altered, reordered or cut short."""


def kek_id(key: bytes) -> str:
    """The KEK's public name: one-way, so it can sit in every file header."""
    hkdf = HKDF(algorithm=hashes.SHA256(), length=_ID_BYTES, salt=None, info=b"fedseek kek id v1")
    return hkdf.derive(key).hex()


@dataclass(frozen=True, repr=False)
class Kek:
    """A key-encryption key, its id and the salt it was derived with (empty: not derived)."""

    key: bytes
    salt: bytes = b""
    id: str = field(init=False)

    def __post_init__(self) -> None:
        if len(self.key) != KEY_BYTES:
            raise KekError(f"a KEK is {KEY_BYTES} bytes, got {len(self.key)}")
        object.__setattr__(self, "id", kek_id(self.key))

    def __repr__(self) -> str:
        return f"Kek(id={self.id})"


class KekSource(Protocol):
    """Where a KEK comes from; `kek(salt)` gives the key for a file's stored salt."""

    needs_salt: bool

    def kek(self, salt: bytes) -> Kek: ...

    def describe(self) -> str: ...

    def spec(self) -> dict[str, Any]: ...


class PassphraseKek:
    """scrypt of a passphrase read from a file only its owner may read (like ssh's keys)."""

    needs_salt = True

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._derived: dict[bytes, Kek] = {}  # one scrypt per salt per process

    def describe(self) -> str:
        return f"passphrase file {self.path}"

    def spec(self) -> dict[str, Any]:
        return {"passphrase_file": str(self.path)}

    def _passphrase(self) -> bytes:
        try:
            mode = self.path.stat().st_mode
            data = self.path.read_bytes()
        except OSError as exc:
            raise KekError(f"KEK passphrase file {self.path}: cannot read ({exc.strerror})") from None
        if stat.S_IMODE(mode) & 0o077:
            raise KekError(
                f"KEK passphrase file {self.path} is readable by others (mode {stat.S_IMODE(mode):o}); chmod 600"
            )
        passphrase = data.removesuffix(b"\n").removesuffix(b"\r")
        if len(passphrase) < MIN_PASSPHRASE:
            raise KekError(f"KEK passphrase file {self.path}: the passphrase is shorter than {MIN_PASSPHRASE} bytes")
        return passphrase

    def kek(self, salt: bytes) -> Kek:
        if len(salt) != SALT_BYTES:
            raise WrongKek(f"a passphrase KEK needs a {SALT_BYTES}-byte salt, the file has {len(salt)} bytes")
        if salt not in self._derived:
            scrypt = Scrypt(salt=salt, length=KEY_BYTES, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P)
            self._derived[salt] = Kek(scrypt.derive(self._passphrase()), salt)
        return self._derived[salt]


class CommandKek:
    """A KEK an external command prints (a KMS or HSM client): run once per process."""

    needs_salt = False

    def __init__(self, argv: Sequence[str], *, timeout: float = 60.0) -> None:
        if not argv or not all(isinstance(a, str) and a for a in argv):
            raise KekError('a KEK command is a non-empty list of strings, e.g. ["kms-unwrap", "site-a"]')
        self.argv = list(argv)
        self.timeout = timeout
        self._kek: Kek | None = None

    def describe(self) -> str:
        return f"KEK command {self.argv[0]}"

    def spec(self) -> dict[str, Any]:
        return {"command": list(self.argv)}

    def kek(self, salt: bytes) -> Kek:
        if salt:
            raise WrongKek("a file with a passphrase salt cannot be under a command's KEK")
        if self._kek is None:
            self._kek = Kek(self._run())
        return self._kek

    def _run(self) -> bytes:
        try:
            done = subprocess.run(self.argv, capture_output=True, timeout=self.timeout, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise KekError(f"{self.describe()}: did not run ({type(exc).__name__}: {exc})") from None
        if done.returncode != 0:
            said = done.stderr.decode("utf-8", "replace").strip().splitlines()
            raise KekError(f"{self.describe()} exited {done.returncode}: {said[-1] if said else 'no message'}")
        return _parse_key(done.stdout.strip(), self.describe())


def _parse_key(text: bytes, where: str) -> bytes:
    """32 bytes from 64 hex digits or base64 (what `openssl rand -hex 32` or a KMS client prints)."""
    with contextlib.suppress(ValueError):
        if len(text) == 2 * KEY_BYTES:
            return bytes.fromhex(text.decode("ascii"))
    with contextlib.suppress(binascii.Error, ValueError):
        key = base64.b64decode(text, validate=True)
        if len(key) == KEY_BYTES:
            return key
    raise KekError(f"{where}: printed no {KEY_BYTES}-byte key (give 64 hex digits or base64 of {KEY_BYTES} bytes)")


def kek_source(spec: Mapping[str, Any]) -> KekSource:
    """The source `NodeConfig.kek` names: {"passphrase_file": PATH} or {"command": [ARGV...]}."""
    if set(spec) == {"passphrase_file"} and isinstance(spec["passphrase_file"], str) and spec["passphrase_file"]:
        return PassphraseKek(Path(spec["passphrase_file"]))
    if set(spec) == {"command"} and isinstance(spec["command"], list):
        return CommandKek(spec["command"])
    raise InvalidInput(
        f'kek must be {{"passphrase_file": PATH}} or {{"command": [ARGV, ...]}}, not {json.dumps(dict(spec))}'
    )


# ---- the file format -------------------------------------------------------------------------
@dataclass(frozen=True)
class _Header:
    chunk: int
    prefix: bytes
    kek_id: str
    salt: bytes
    wrap_nonce: bytes
    wrapped: bytes

    @property
    def data_header(self) -> bytes:
        return _DATA_HEADER.pack(MAGIC, VERSION, self.chunk, self.prefix)

    @property
    def wrap_aad(self) -> bytes:
        return self.data_header + bytes.fromhex(self.kek_id) + bytes([len(self.salt)]) + self.salt

    def encode(self) -> bytes:
        return self.wrap_aad + self.wrap_nonce + self.wrapped

    @classmethod
    def read(cls, fh: BinaryIO, name: str) -> _Header:
        head = fh.read(_DATA_HEADER.size + _ID_BYTES + 1)
        if len(head) < 4 or head[:4] != MAGIC:
            raise TamperedFile(f"{name}: not a FedSeek encrypted file (no {MAGIC.decode()} header)")
        if len(head) < _DATA_HEADER.size + _ID_BYTES + 1:
            raise TamperedFile(f"{name}: encrypted file cut short in its header")
        _, version, chunk, prefix = _DATA_HEADER.unpack(head[: _DATA_HEADER.size])
        if version != VERSION or not 0 < chunk <= 1 << 24:
            raise TamperedFile(f"{name}: unknown encrypted-file version {version} or chunk size {chunk} (altered?)")
        kid = head[_DATA_HEADER.size : _DATA_HEADER.size + _ID_BYTES].hex()
        salt_len = head[-1]
        if salt_len not in (0, SALT_BYTES):
            raise TamperedFile(f"{name}: encrypted-file header altered (salt length {salt_len})")
        rest = fh.read(salt_len + _NONCE_BYTES + _WRAPPED_BYTES)
        if len(rest) != salt_len + _NONCE_BYTES + _WRAPPED_BYTES:
            raise TamperedFile(f"{name}: encrypted file cut short in its header")
        salt, rest = rest[:salt_len], rest[salt_len:]
        return cls(chunk, prefix, kid, salt, rest[:_NONCE_BYTES], rest[_NONCE_BYTES:])


def _nonce(prefix: bytes, index: int, last: bool) -> bytes:
    if index >= 1 << 32:
        raise ValueError("file too large for one envelope (2^32 chunks)")
    return prefix + index.to_bytes(4, "big") + (b"\x01" if last else b"\x00")


def _chunks(fh: BinaryIO, size: int) -> Iterator[tuple[bytes, bool]]:
    """`fh` in blocks of `size`, each with whether it is the last (one block of lookahead); an
    empty stream is one empty last block."""
    block = fh.read(size)
    while True:
        ahead = fh.read(size) if len(block) == size else b""
        yield block, not ahead
        if not ahead:
            return
        block = ahead


def is_encrypted(path: Path) -> bool:
    """Whether `path` is a regular file that starts like an envelope."""
    try:
        if not path.is_file() or path.is_symlink():
            return False
        with path.open("rb") as fh:
            return fh.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


class Envelope:
    """Encrypt and decrypt files under the site's KEK: `current` wraps new data keys; `older`
    sources still open files wrapped by them (during a rotation)."""

    def __init__(self, current: KekSource, *, salt: bytes = b"", older: Sequence[KekSource] = ()) -> None:
        self.source = current
        self.current = current.kek(salt if current.needs_salt else b"")
        self._sources = [current, *older]

    @property
    def kek_id(self) -> str:
        return self.current.id

    # -- keys --
    def _wrap(self, prefix: bytes, chunk: int, data_key: bytes) -> _Header:
        header = _Header(chunk, prefix, self.current.id, self.current.salt, os.urandom(_NONCE_BYTES), b"")
        wrapped = AESGCM(self.current.key).encrypt(header.wrap_nonce, data_key, header.wrap_aad)
        return _Header(chunk, prefix, self.current.id, self.current.salt, header.wrap_nonce, wrapped)

    def _kek_for(self, header: _Header, name: str) -> Kek:
        for source in self._sources:
            if bool(header.salt) != source.needs_salt:
                continue
            kek = source.kek(header.salt)
            if kek.id == header.kek_id:
                return kek
        raise WrongKek(
            f"{name}: encrypted under KEK {header.kek_id}, not the configured KEK {self.current.id}; "
            "configure that KEK (or its header was altered)"
        )

    def _unwrap(self, header: _Header, name: str) -> bytes:
        kek = self._kek_for(header, name)
        try:
            return AESGCM(kek.key).decrypt(header.wrap_nonce, header.wrapped, header.wrap_aad)
        except InvalidTag:
            raise TamperedFile(f"{name}: encrypted-file header altered (its data key does not unwrap)") from None

    # -- streams --
    def _encrypted(self, src: BinaryIO, *, context: str, chunk: int) -> Iterator[bytes]:
        """The envelope of everything `src` holds, piece by piece (header, then each sealed chunk)."""
        data_key = AESGCM.generate_key(bit_length=256)
        header = self._wrap(os.urandom(_PREFIX_BYTES), chunk, data_key)
        yield header.encode()
        aead, aad = AESGCM(data_key), header.data_header + context.encode("utf-8")
        for index, (block, last) in enumerate(_chunks(src, chunk)):
            yield aead.encrypt(_nonce(header.prefix, index, last), block, aad)

    def _decrypted(self, src: BinaryIO, *, name: str, context: str) -> Iterator[bytes]:
        """`src`'s plaintext chunk by chunk; TamperedFile or WrongKek (naming `name`) at the first
        chunk that does not open."""
        header = _Header.read(src, name)
        aead = AESGCM(self._unwrap(header, name))
        aad = header.data_header + context.encode("utf-8")
        for index, (block, last) in enumerate(_chunks(src, header.chunk + _TAG_BYTES)):
            if len(block) < _TAG_BYTES:
                raise TamperedFile(f"{name}: encrypted file cut short (chunk {index})")
            try:
                yield aead.decrypt(_nonce(header.prefix, index, last), block, aad)
            except InvalidTag:
                raise TamperedFile(
                    f"{name}: encrypted file altered, reordered, cut short or moved (chunk {index} does not open)"
                ) from None

    def encrypt_stream(self, src: BinaryIO, dst: BinaryIO, *, context: str = "", chunk: int = CHUNK_BYTES) -> None:
        """Write the envelope of everything `src` holds to `dst`, one chunk in memory at a time."""
        for piece in self._encrypted(src, context=context, chunk=chunk):
            dst.write(piece)

    def decrypt_stream(self, src: BinaryIO, dst: BinaryIO, *, name: str, context: str = "") -> None:
        """Write `src`'s plaintext to `dst`. A caller that must not act on part of a file writes `dst`
        to memory or a temporary file and uses it only once this returns without an error."""
        for piece in self._decrypted(src, name=name, context=context):
            dst.write(piece)

    # -- bytes and files --
    def encrypt_bytes(self, data: bytes, *, context: str = "", chunk: int = CHUNK_BYTES) -> bytes:
        """The envelope of `data`, sealed chunk by chunk straight into one preallocated buffer."""
        data_key = AESGCM.generate_key(bit_length=256)
        header = self._wrap(os.urandom(_PREFIX_BYTES), chunk, data_key).encode()
        count = max(1, -(-len(data) // chunk))
        out = bytearray(len(header) + len(data) + count * _TAG_BYTES)
        out[: len(header)] = header
        aead, aad = AESGCM(data_key), header[: _DATA_HEADER.size] + context.encode("utf-8")
        prefix = header[_DATA_HEADER.size - _PREFIX_BYTES : _DATA_HEADER.size]
        src, dst = memoryview(data), memoryview(out)
        at = len(header)
        for index in range(count):
            block = src[index * chunk : (index + 1) * chunk]
            aead.encrypt_into(
                _nonce(prefix, index, index == count - 1), block, aad, dst[at : at + len(block) + _TAG_BYTES]
            )
            at += len(block) + _TAG_BYTES
        return bytes(out)

    def decrypt_bytes(self, blob: bytes, *, name: str, context: str = "") -> bytes:
        return self._decrypt_sized(io.BytesIO(blob), len(blob), name=name, context=context)

    def _decrypt_sized(self, src: BinaryIO, size: int, *, name: str, context: str) -> bytes:
        """The plaintext of an envelope of `size` bytes, opened chunk by chunk into one preallocated
        buffer (the chunk count, and so which chunk is the last, follows from the size)."""
        header = _Header.read(src, name)
        body = size - src.tell()
        step = header.chunk + _TAG_BYTES
        count = max(1, -(-body // step))
        if body - (count - 1) * step < _TAG_BYTES:  # the last chunk is shorter than its tag
            raise TamperedFile(f"{name}: encrypted file cut short (chunk {count - 1})")
        aead = AESGCM(self._unwrap(header, name))
        aad = header.data_header + context.encode("utf-8")
        out = bytearray(body - count * _TAG_BYTES)
        dst, at = memoryview(out), 0
        for index in range(count):
            block = src.read(step)
            if len(block) != min(step, body - index * step):
                raise TamperedFile(f"{name}: encrypted file changed while it was read (chunk {index})")
            try:
                aead.decrypt_into(
                    _nonce(header.prefix, index, index == count - 1), block, aad, dst[at : at + len(block) - _TAG_BYTES]
                )
            except InvalidTag:
                raise TamperedFile(
                    f"{name}: encrypted file altered, reordered, cut short or moved (chunk {index} does not open)"
                ) from None
            at += len(block) - _TAG_BYTES
        return bytes(out)

    def write(self, path: Path, data: bytes, *, context: str = "") -> None:
        """Encrypt `data` into `path` atomically (0600)."""
        write_atomic(path, self.encrypt_bytes(data, context=context))

    def read(self, path: Path, *, context: str = "") -> bytes:
        """The plaintext of the encrypted file `path`; errors name the file."""
        try:
            with Path(path).open("rb") as fh:
                return self._decrypt_sized(fh, os.fstat(fh.fileno()).st_size, name=str(path), context=context)
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise AtRestError(f"{path}: cannot read ({exc.strerror})") from None

    def encrypt_file(self, src: Path, dst: Path, *, context: str = "") -> None:
        """Encrypt the file `src` into `dst` (atomically, streamed: any size)."""
        with Path(src).open("rb") as fin, atomic_writer(dst) as fout:
            self.encrypt_stream(fin, fout, context=context)

    def rewrap(self, path: Path) -> bool:
        """Wrap `path`'s data key under the current KEK: the key header is rewritten, the body's bytes
        are copied unchanged (never decrypted); False if it already was. Atomic per file."""
        with Path(path).open("rb") as fin:
            header = _Header.read(fin, str(path))
            if header.kek_id == self.current.id:
                return False
            data_key = self._unwrap(header, str(path))
            new = self._wrap(header.prefix, header.chunk, data_key)
            with atomic_writer(path, mode=stat.S_IMODE(os.fstat(fin.fileno()).st_mode)) as fout:
                fout.write(new.encode())
                while block := fin.read(1 << 20):
                    fout.write(block)
        return True


def header_kek_id(path: Path) -> str:
    """The id of the KEK an encrypted file's data key is wrapped under (TamperedFile if not one)."""
    with Path(path).open("rb") as fh:
        return _Header.read(fh, str(path)).kek_id


def body_offset(path: Path) -> int:
    """Where the ciphertext chunks begin (tests compare bodies across a rotation)."""
    with Path(path).open("rb") as fh:
        _Header.read(fh, str(path))
        return fh.tell()


def encrypted_files(*roots: Path) -> list[Path]:
    """Every envelope under `roots` (found by its magic, not its name), sorted; symlinks not followed."""
    found: set[Path] = set()
    for root in roots:
        if not Path(root).is_dir():
            continue
        for dirpath, _dirs, files in os.walk(root):
            for name in files:
                path = Path(dirpath) / name
                if not name.endswith(".tmp") and is_encrypted(path):
                    found.add(path)
    return sorted(found)


# ---- the site's KEK state (`NodeLayout.kek`) ---------------------------------------------------
def read_kek_state(path: Path) -> dict[str, Any] | None:
    """`kek.json`: the id of the site's KEK and, for a passphrase KEK, the salt new files use. It
    holds no key: lost, a file's own header still names its KEK and salt (only the check at start
    that the configured KEK is the site's is lost)."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise KekError(f"{path}: unreadable KEK state ({exc}); restore it from backup") from None
    if not isinstance(raw, dict) or raw.get("format") != KEK_STATE_FORMAT or not isinstance(raw.get("id"), str):
        raise KekError(f"{path}: not a FedSeek KEK state file; restore it from backup")
    return raw


def write_kek_state(path: Path, envelope: Envelope, *, previous: Sequence[str] = ()) -> None:
    state = {
        "format": KEK_STATE_FORMAT,
        "id": envelope.kek_id,
        "source": next(iter(envelope.source.spec())),
        "salt": base64.b64encode(envelope.current.salt).decode("ascii"),
        "kdf": {"name": "scrypt", "n": _SCRYPT_N, "r": _SCRYPT_R, "p": _SCRYPT_P} if envelope.current.salt else None,
        "since": datetime.now(UTC).isoformat(timespec="seconds"),
        "previous": list(previous),
    }
    write_atomic(Path(path), json.dumps(state, indent=1))


def site_envelope(spec: Mapping[str, Any], state_file: Path, *, create: bool = True) -> Envelope | None:
    """The envelope of a site whose config names KEK `spec` (None: no KEK, nothing encrypted).

    The KEK is checked against the site's `kek.json` (the id of the KEK its files are under), so a
    wrong passphrase or command is one line at start, not a failure at the first file. A site's
    first KEK writes `kek.json` (with a fresh salt for a passphrase)."""
    if not spec:
        return None
    source = kek_source(spec)
    state = read_kek_state(state_file)
    salt = b""
    if source.needs_salt:
        stored = base64.b64decode(state["salt"]) if state and state.get("salt") else b""
        salt = stored if len(stored) == SALT_BYTES else os.urandom(SALT_BYTES)
    envelope = Envelope(source, salt=salt)
    if state is not None and state["id"] != envelope.kek_id:
        raise WrongKek(
            f"{source.describe()} gives KEK {envelope.kek_id}, but this site's files are under KEK {state['id']} "
            f"({state_file}); configure that KEK, or rotate with `fedseek keys rotate`"
        )
    if state is None and create:
        write_kek_state(state_file, envelope)
    return envelope
