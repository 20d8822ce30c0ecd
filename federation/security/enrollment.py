"""Enrolling a site without moving its private keys: request on the site, sign at the CA, install on the site.

On the site (`fedseek node enroll`), ``pki_dir/<site>/`` gets::

    key.pem               the site's TLS key (0600); never leaves the site
    supernode_auth.key    the SuperNode's Flower auth key (0600); never leaves the site
    supernode_auth.pub    its public half, registered by the CA operator with the certificate
    request.csr           the PKCS#10 request to carry to the CA operator

At the CA (`fedseek ca sign request.csr --role node`), `pki.sign_request` issues the certificate
under the CA's policy and `register_site_key` records the Flower key beside it; the CA's
``pki_dir/<site>/`` then holds the bundle to carry back (cert.pem, ca.pem, crl.pem,
publishers.json) and no key. Back on the site, `accept_bundle` (`fedseek node enroll --accept
DIR`) checks the certificate is for this site's key, chains to the CA and is not revoked, and
installs it in one directory swap.

Renewal (`--renew`) makes ``key.new.pem`` (or keeps the key with ``keep_key``), a new request,
and ``renewal.sig``, the current key's signature over it, which is how the CA knows the request
comes from the certificate's holder. The running node keeps its old key and certificate until
`accept_bundle` swaps both in at once.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from federation.ops.atomic import install_dir, write_atomic
from federation.security.app_signing import PUBLISHERS_FILE
from federation.security.flower_auth import auth_key_paths, ensure_auth_keypair
from federation.security.pki import SITE_KEYS_DIR, Identity, PKIError, build_request, renewal_proof, request_pem
from federation.security.pki.clock import utcnow
from federation.security.pki.identity import check_name
from federation.security.pki.layout import CRL_FILE, LEAF_CA, LEAF_CERT, LEAF_KEY
from federation.security.pki.party import verify_leaf
from federation.security.pki.pem import leaf_key_pem, load_cert, load_leaf_key

__all__ = [
    "NEW_KEY",
    "PROOF_FILE",
    "REQUEST_FILE",
    "Request",
    "accept_bundle",
    "make_request",
    "register_site_key",
]

REQUEST_FILE = "request.csr"
PROOF_FILE = "renewal.sig"
NEW_KEY = "key.new.pem"
# What the CA's bundle brings; the site's keys are never among them.
BUNDLE_FILES = (LEAF_CERT, LEAF_CA, CRL_FILE, PUBLISHERS_FILE)


@dataclass(frozen=True)
class Request:
    """What `make_request` left for the operator to carry to the CA (None: nothing to do yet)."""

    csr: Path | None
    proof: Path | None
    flower_key: Path
    renewal: bool
    note: str


def make_request(
    pki_dir: Path,
    name: str,
    *,
    hosts: Sequence[str] = (),
    renew: bool = False,
    keep_key: bool = False,
    if_due: timedelta | None = None,
) -> Request:
    """Make the site's key (unless it has one) and a certificate request, in ``pki_dir/<name>/``.

    First enrollment refuses a site that already has a certificate (renew it instead). A renewal
    with ``if_due`` does nothing while the certificate has longer than that to run, and nothing
    while a renewal request is already waiting for its certificate: a timer can call it daily.
    """
    check_name(name, what="party name")
    site = Path(pki_dir) / name
    cert_path, key_path = site / LEAF_CERT, site / LEAF_KEY
    flower = ensure_auth_keypair(site).public_key  # makes the directory too
    site.chmod(0o700)
    if not renew:
        if cert_path.exists():
            raise PKIError(f"{site} already holds a certificate; renew it with `fedseek node enroll --renew`")
        key = load_leaf_key(key_path) if key_path.is_file() else ec.generate_private_key(ec.SECP256R1())
        if not key_path.is_file():
            write_atomic(key_path, leaf_key_pem(key), mode=0o600)
        csr = build_request(key, name, hosts=hosts)
        write_atomic(site / REQUEST_FILE, request_pem(csr), mode=0o644)
        return Request(site / REQUEST_FILE, None, flower, renewal=False, note="new key and request")

    if not cert_path.is_file() or not key_path.is_file():
        raise PKIError(f"nothing to renew in {site}: enroll first (`fedseek node enroll` without --renew)")
    current_key = load_leaf_key(key_path)
    cert = load_cert(cert_path)
    if current_key.public_key() != cert.public_key():
        raise PKIError(f"{key_path} does not match {cert_path}; the site's files are damaged")
    left = cert.not_valid_after_utc - utcnow()
    if if_due is not None and left > if_due:
        return Request(None, None, flower, renewal=True, note=f"not due: the certificate has {left.days} days left")
    if if_due is not None and (site / PROOF_FILE).is_file():
        return Request(site / REQUEST_FILE, site / PROOF_FILE, flower, renewal=True, note="a renewal request waits")
    if keep_key:
        key = current_key
        (site / NEW_KEY).unlink(missing_ok=True)
    else:
        key = ec.generate_private_key(ec.SECP256R1())
        write_atomic(site / NEW_KEY, leaf_key_pem(key), mode=0o600)
    csr = build_request(key, name, hosts=hosts)
    write_atomic(site / REQUEST_FILE, request_pem(csr), mode=0o644)
    write_atomic(site / PROOF_FILE, renewal_proof(current_key, csr), mode=0o644)
    note = "renewal request with the current key" if keep_key else "renewal request with a new key"
    return Request(site / REQUEST_FILE, site / PROOF_FILE, flower, renewal=True, note=note)


def accept_bundle(pki_dir: Path, name: str, bundle: Path) -> Identity:
    """Install the CA's answer (``bundle``: its ``<pki>/<name>/`` directory) into the site's directory.

    Refused unless the certificate is this site's, for the key waiting here (``key.new.pem`` of a
    renewal, else ``key.pem``), chains to the CA and is not revoked; on a renewal the CA must be
    the one the site already trusts. Key, certificate and CRL change in one directory swap.
    """
    check_name(name, what="party name")
    site = Path(pki_dir) / name
    bundle = Path(bundle)
    missing = [f for f in BUNDLE_FILES[:3] if not (bundle / f).is_file()]
    if missing:
        raise PKIError(f"{bundle} is not a certificate bundle from `fedseek ca sign` (missing {', '.join(missing)})")
    ident = verify_leaf(bundle / LEAF_CERT, bundle / LEAF_CA, crl=bundle / CRL_FILE)
    if ident.name != name:
        raise PKIError(f"the certificate in {bundle} is for '{ident.name}', not '{name}'")
    public = load_cert(bundle / LEAF_CERT).public_key()
    new_key = site / NEW_KEY
    if new_key.is_file() and load_leaf_key(new_key).public_key() == public:
        promote = True
    elif (site / LEAF_KEY).is_file() and load_leaf_key(site / LEAF_KEY).public_key() == public:
        promote = False
    else:
        raise PKIError(f"the certificate in {bundle} is not for this site's key in {site} (an older request's?)")
    trusted = site / LEAF_CA
    if trusted.is_file():
        before = load_cert(trusted).fingerprint(hashes.SHA256())
        if load_cert(bundle / LEAF_CA).fingerprint(hashes.SHA256()) != before:
            raise PKIError(f"{bundle / LEAF_CA} is not the consortium CA this site trusts ({trusted})")
    staging = Path(tempfile.mkdtemp(dir=site.parent, prefix=f".{name}.accept-"))
    try:
        shutil.copytree(site, staging, symlinks=True, dirs_exist_ok=True)
        for f in BUNDLE_FILES:
            if (bundle / f).is_file():
                write_atomic(staging / f, (bundle / f).read_bytes(), mode=0o644)
        if promote:
            (staging / NEW_KEY).rename(staging / LEAF_KEY)
        for f in (REQUEST_FILE, PROOF_FILE):
            (staging / f).unlink(missing_ok=True)
        staging.chmod(0o700)  # the site's keys live here
        install_dir(staging, site)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ident


def register_site_key(pki_dir: Path, name: str, public_key: Path) -> Path:
    """Record site ``name``'s Flower auth public key (from its enrollment) for the coordinator."""
    check_name(name, what="party name")
    try:
        parsed = serialization.load_ssh_public_key(Path(public_key).read_bytes().strip())
    except (OSError, ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise PKIError(f"{public_key} is not the site's Flower auth public key (an OpenSSH public key line)") from exc
    if not isinstance(parsed, ec.EllipticCurvePublicKey):
        raise PKIError(f"{public_key} is not an EC key, which Flower's SuperNode authentication needs")
    key = parsed.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    site_keys = Path(pki_dir) / SITE_KEYS_DIR
    site_keys.mkdir(exist_ok=True)
    dest = site_keys / f"{name}.pub"
    write_atomic(dest, key + b"\n", mode=0o644)
    return dest


def flower_key_of(site_dir: Path) -> Path:
    """Where `make_request` put the site's Flower auth public key."""
    return auth_key_paths(site_dir).public_key
