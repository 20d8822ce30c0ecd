"""Consortium certificate authority for FedSeek.

Every party (coordinator, hospital nodes, reviewers, admins) authenticates to every other party
with mutual TLS, so one small CA issues all certificates. Callers use this package's names
(`from federation.security import pki; pki.issue(...)`); the modules, one job each:

- `ca`: the CA's operations (init, issue, renew, revoke, publish and refresh the CRL), all-or-nothing on disk;
- `request`: certificate requests: a party makes its own key and request, the CA signs it with its policy;
- `party`: what a party checks before it starts TLS (its files, a peer's chain, validity, revocation);
- `status`: which certificates are issued and in what state (no passphrase needed);
- `identity`: who a certificate speaks for (name, role, consortium, hosts), the naming rules, and
  whether a verified peer is a party of this consortium (`check_member`);
- `hosts`: which host names a role's certificate may carry (loopback, the coordinator's role name);
- `layout`: the file layout of a PKI directory;
- `crl`: signing, reading and checking the revocation list;
- `passphrase`: the CA passphrase (argument, environment, 0600 file);
- `publisher`: the consortium's app-publisher key (sites run only app bundles it signed);
- `signer`, `certs`, `index`, `pem`, `clock`, `errors`: the CA key, certificate contents, the CA's
  records, PEM encoding, time, and `PKIError`.
"""

from __future__ import annotations

from federation.security.pki.ca import (
    DEFAULT_LEAF_DAYS,
    MAX_LEAF_DAYS,
    init_ca,
    issue,
    refresh_crl,
    renew,
    revoke,
    write_crl,
)
from federation.security.pki.crl import CRL_DAYS, Reason, is_revoked, load_crl
from federation.security.pki.errors import PKIError
from federation.security.pki.hosts import coordinator_host
from federation.security.pki.identity import (
    Identity,
    Role,
    check_member,
    consortium_of,
    identity_from_der,
    read_identity,
)
from federation.security.pki.layout import SITE_KEYS_DIR, CAFiles, LeafFiles
from federation.security.pki.party import load_leaf, load_party, verify_leaf
from federation.security.pki.passphrase import (
    MIN_PASSPHRASE_LEN,
    PASSPHRASE_ENV,
    generate_passphrase_file,
    read_passphrase_file,
)
from federation.security.pki.publisher import create_publisher, load_publisher_key, party_publishers
from federation.security.pki.request import (
    Signed,
    build_request,
    load_request,
    renewal_proof,
    request_name,
    request_pem,
    sign_request,
)
from federation.security.pki.status import Status, list_issued, list_status

__all__ = [
    "CRL_DAYS",
    "DEFAULT_LEAF_DAYS",
    "MAX_LEAF_DAYS",
    "MIN_PASSPHRASE_LEN",
    "PASSPHRASE_ENV",
    "SITE_KEYS_DIR",
    "CAFiles",
    "Identity",
    "LeafFiles",
    "PKIError",
    "Reason",
    "Role",
    "Signed",
    "Status",
    "build_request",
    "check_member",
    "consortium_of",
    "coordinator_host",
    "create_publisher",
    "generate_passphrase_file",
    "identity_from_der",
    "init_ca",
    "is_revoked",
    "issue",
    "list_issued",
    "list_status",
    "load_crl",
    "load_leaf",
    "load_party",
    "load_publisher_key",
    "load_request",
    "party_publishers",
    "read_identity",
    "read_passphrase_file",
    "refresh_crl",
    "renew",
    "renewal_proof",
    "request_name",
    "request_pem",
    "revoke",
    "sign_request",
    "verify_leaf",
    "write_crl",
]
