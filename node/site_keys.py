"""The site's secret: keyed prompt digests and explanations sealed at rest.

An audit record must tie a model call to its prompt without holding the prompt; a plain
SHA-256 does not do that for clinical text: a note's fields (age, sex, postcode, a handful of
diagnoses) are few enough to hash every combination and look the digest up. So digests are
HMAC-SHA256 under a key only this site holds, and the explanations a reviewer fetches later
(they quote the prompt token by token) are stored encrypted, AES-256-GCM, under a second key.

Both keys are derived (HKDF-SHA256, one label each) from 32 random bytes made on the node's
first start, `NodeLayout.site_secret` (0600). Losing the file loses nothing but the ability to
link new digests to old ones and to read stored explanations: keep it with the site's backups,
never with the audit trail it keys.

A site with a key-encryption key (`NodeConfig.kek`, federation.security.at_rest) seals new
explanations as envelopes instead: a data key per file wrapped by the KEK, which is never a file
beside the data, so a copy of the state directory alone opens none of them; `fedseek keys rotate`
re-wraps them with the site's other encrypted files. Files sealed under the site key before the KEK
was configured still open (each file says by its first bytes which it is). The digest key stays
derived from the site secret: a KEK rotation must not change the digests that link audit records.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from federation.errors import FedSeekError
from federation.ops.atomic import ensure_secret
from federation.security.at_rest import MAGIC as ENVELOPE_MAGIC
from federation.security.at_rest import Envelope

__all__ = ["SECRET_BYTES", "SealError", "SiteKeys", "load_site_keys"]

SECRET_BYTES = 32
_NONCE_BYTES = 12
_MAGIC = b"FSK1"  # format tag of a sealed file, so a plain file is never mistaken for one


class SealError(FedSeekError):
    """A sealed file does not open with this site's key (another site's, damaged, or moved)."""


def _derive(secret: bytes, label: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"fedseek " + label).derive(secret)


@dataclass(frozen=True, repr=False)
class SiteKeys:
    """The keys derived from one site secret (never printed: `repr` shows no bytes)."""

    prompt: bytes  # HMAC-SHA256 of prompts and responses in the audit trail
    explanations: bytes  # AES-256-GCM of stored explanations (a site without a KEK)
    envelope: Envelope | None = None  # the site's KEK envelope: new files are sealed under it

    @classmethod
    def from_secret(cls, secret: bytes) -> SiteKeys:
        if len(secret) != SECRET_BYTES:
            raise ValueError(f"a site secret is {SECRET_BYTES} bytes, got {len(secret)}")
        return cls(prompt=_derive(secret, b"prompt-hmac v1"), explanations=_derive(secret, b"explanations-aes-gcm v1"))

    @classmethod
    def ephemeral(cls) -> SiteKeys:
        """Keys that die with the process (a Serving built without a site: tests, benchmarks)."""
        return cls.from_secret(secrets.token_bytes(SECRET_BYTES))

    def __repr__(self) -> str:
        return "SiteKeys(<secret>)"

    def digest(self, text: str) -> str:
        """Hex HMAC-SHA256 of UTF-8 text: equal texts match at this site; without the key no guess can be tested."""
        return hmac.new(self.prompt, text.encode("utf-8"), hashlib.sha256).hexdigest()

    def with_envelope(self, envelope: Envelope | None) -> SiteKeys:
        """These keys, sealing new files under `envelope` (the site's KEK) when there is one."""
        return SiteKeys(prompt=self.prompt, explanations=self.explanations, envelope=envelope)

    def seal(self, data: bytes, *, label: str) -> bytes:
        """Encrypt and authenticate `data`, bound to `label` (e.g. "<explanation id>/json"): a
        sealed file copied under another name does not open."""
        if self.envelope is not None:
            return self.envelope.encrypt_bytes(data, context=f"sealed/{label}")
        nonce = os.urandom(_NONCE_BYTES)
        return _MAGIC + nonce + AESGCM(self.explanations).encrypt(nonce, data, label.encode("utf-8"))

    def unseal(self, blob: bytes, *, label: str) -> bytes:
        if blob.startswith(ENVELOPE_MAGIC):
            if self.envelope is None:
                raise SealError(f"{label}: sealed under a KEK and this site has none configured (NodeConfig.kek)")
            return self.envelope.decrypt_bytes(blob, name=label, context=f"sealed/{label}")
        if not blob.startswith(_MAGIC) or len(blob) < len(_MAGIC) + _NONCE_BYTES + 16:
            raise SealError(f"{label}: not a sealed FedSeek file")
        nonce, body = blob[len(_MAGIC) : len(_MAGIC) + _NONCE_BYTES], blob[len(_MAGIC) + _NONCE_BYTES :]
        try:
            return AESGCM(self.explanations).decrypt(nonce, body, label.encode("utf-8"))
        except InvalidTag:
            raise SealError(
                f"{label}: does not open with this site's key (another site's, damaged or renamed)"
            ) from None


def load_site_keys(path: Path, *, envelope: Envelope | None = None) -> SiteKeys:
    """The site's keys from `path` (`NodeLayout.site_secret`), made (0600, exclusively) on first start;
    with `envelope`, new files are sealed under the site's KEK."""
    secret = ensure_secret(path, lambda: secrets.token_bytes(SECRET_BYTES))
    if len(secret) != SECRET_BYTES:
        raise FedSeekError(
            f"{path}: a site secret is {SECRET_BYTES} bytes, this file has {len(secret)}; restore it from backup"
        )
    return SiteKeys.from_secret(secret).with_envelope(envelope)
