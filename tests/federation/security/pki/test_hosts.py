"""Finding 5: which host names each role's certificate may carry (loopback, the coordinator's names).

Every refusal is one PKIError line and leaves the PKI directory as it was.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from federation.security.pki import PKIError, coordinator_host, issue, load_party, read_identity, renew
from federation.security.pki.certs import san_entries, sign_leaf
from federation.security.pki.clock import utcnow
from federation.security.pki.pem import cert_pem, leaf_key_pem, load_leaf_key
from federation.security.pki.signer import open_ca
from tests.federation.security.pki.support import PASS, snapshot

ROLE_NAME = "coordinator.fedseek.fedseek.internal"  # the `pki` fixture's consortium is "fedseek"


def test_role_name() -> None:
    assert coordinator_host("fedseek") == ROLE_NAME


@pytest.mark.parametrize("role", ["reviewer", "admin", "monitor"])
@pytest.mark.parametrize(
    "host", ["localhost", "127.0.0.1", "::1", "127.0.0.2", "::ffff:127.0.0.1", "ws.localhost", "LOCALHOST.", "0.0.0.0"]
)
def test_clients_carry_no_loopback_name(pki: Path, role: str, host: str) -> None:
    before = snapshot(pki)
    with pytest.raises(PKIError, match=f"a {role} certificate may not name .*loopback names it may carry: none"):
        issue(pki, "who", role=role, hosts=("who.example", host))  # type: ignore[arg-type]
    assert snapshot(pki) == before


@pytest.mark.parametrize("host", ["localhost", "::1", "127.0.0.53"])
def test_a_node_carries_127_0_0_1_only(pki: Path, host: str) -> None:
    with pytest.raises(PKIError, match=r"a node certificate may not name .*may carry: 127\.0\.0\.1"):
        issue(pki, "site-a", role="node", hosts=(host,))


@pytest.mark.parametrize("role", ["node", "reviewer", "admin", "monitor"])
@pytest.mark.parametrize("host", [ROLE_NAME, "Coordinator.Fedseek.Fedseek.Internal.", "x.fedseek.internal"])
def test_only_the_coordinator_carries_its_role_name(pki: Path, role: str, host: str) -> None:
    before = snapshot(pki)
    with pytest.raises(PKIError, match="is a role name: only the coordinator certificate carries"):
        issue(pki, "mallory", role=role, hosts=(host,))  # type: ignore[arg-type]
    assert snapshot(pki) == before


def test_a_coordinator_carries_no_other_consortiums_role_name(pki: Path) -> None:
    with pytest.raises(PKIError, match="is a role name"):
        issue(pki, "coordinator", role="coordinator", hosts=("coordinator.other.fedseek.internal",))


def test_coordinator_host_names_stay_on_coordinator_certificates(pki: Path) -> None:
    issue(pki, "coordinator", role="coordinator", hosts=("fl.example.org",))
    before = snapshot(pki)
    for role in ("node", "reviewer", "admin"):
        with pytest.raises(PKIError, match=r"host 'fl\.example\.org' is on coordinator certificate 'coordinator'"):
            issue(pki, "mallory", role=role, hosts=("FL.example.org",))  # type: ignore[arg-type]
    assert snapshot(pki) == before
    # ...and the other way round: a coordinator may not take a site's name
    issue(pki, "site-a", role="node", hosts=("site-a.example",))
    with pytest.raises(PKIError, match=r"host 'site-a\.example' is on node certificate 'site-a'"):
        issue(pki, "coordinator-2", role="coordinator", hosts=("site-a.example",))
    # re-issuing the coordinator itself keeps its own names
    assert (
        "fl.example.org"
        in read_identity(issue(pki, "coordinator", role="coordinator", hosts=("fl.example.org",)).cert).hosts
    )


def test_wildcards_are_refused(pki: Path) -> None:
    with pytest.raises(PKIError, match="wildcard host"):
        issue(pki, "site-a", role="node", hosts=("*.example.org",))


def test_renewal_drops_loopback_names_a_role_may_no_longer_carry(pki: Path) -> None:
    """A reviewer certificate from before this rule (it carried localhost) renews without them."""
    leaf = issue(pki, "rita", role="reviewer", hosts=("rita.example",))
    ca = open_ca(pki, PASS, utcnow())
    now = utcnow()
    legacy = sign_leaf(
        ca,
        load_leaf_key(leaf.key),
        name="rita",
        role="reviewer",
        sans=san_entries(["rita.example", "localhost", "127.0.0.1"]),
        not_before=now - timedelta(minutes=1),
        not_after=now + timedelta(days=5),
    )
    leaf.cert.write_bytes(cert_pem(legacy))
    assert read_identity(leaf.cert).hosts == ("rita.example", "localhost", "127.0.0.1")
    assert read_identity(renew(pki, "rita").cert).hosts == ("rita.example",)


def test_renewing_an_old_coordinator_certificate_adds_its_role_name(pki: Path) -> None:
    """A coordinator certificate from before this rule lacks its role name; `load_party` says so
    and `renew` adds it."""
    leaf = issue(pki, "coordinator", role="coordinator")
    ca = open_ca(pki, PASS, utcnow())
    now = utcnow()
    key = ec.generate_private_key(ec.SECP256R1())
    old = sign_leaf(
        ca,
        key,
        name="coordinator",
        role="coordinator",
        sans=san_entries(["localhost", "127.0.0.1"]),
        not_before=now - timedelta(minutes=1),
        not_after=now + timedelta(days=5),
    )
    leaf.cert.write_bytes(cert_pem(old))
    leaf.key.write_bytes(leaf_key_pem(key))
    with pytest.raises(PKIError, match=r"lacks the coordinator's role name .* renew it"):
        load_party(pki, "coordinator", role="coordinator")
    renew(pki, "coordinator")
    assert ROLE_NAME in read_identity(load_party(pki, "coordinator", role="coordinator").cert).hosts
