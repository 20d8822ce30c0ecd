"""Identities read back from issued certificates: subject, hosts and extensions."""

from __future__ import annotations

import ipaddress
from datetime import timedelta
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from federation.security.pki import issue, read_identity
from tests.federation.security.pki.support import read_cert


def test_identity_fields_and_extensions(pki: Path) -> None:
    leaf = issue(pki, "site-a", role="node", hosts=("site-a.example", "127.0.0.1", "fd00::1"))
    ident = read_identity(leaf.cert)
    assert ident.name == "site-a"
    assert ident.role == "node"
    assert ident.consortium == "fedseek"
    assert ident.hosts == ("site-a.example", "127.0.0.1", "fd00::1")
    assert len(ident.fingerprint_sha256) == 64
    assert timedelta(days=29) < ident.not_after - ident.not_before <= timedelta(days=31)

    cert = read_cert(leaf.cert)
    assert read_identity(cert) == ident
    assert cert.serial_number == ident.serial
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["site-a.example"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("fd00::1"),
    ]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.CLIENT_AUTH,
    }
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and not ku.key_cert_sign
    cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)

    ca = read_cert(pki / "ca" / "ca.pem")
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical
    assert bc.value.ca
    ku = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign
    assert ku.crl_sign


def test_default_hosts_are_the_loopback_names_each_role_needs(pki: Path) -> None:
    """Finding 5: loopback names only on certificates served on loopback; the coordinator's role name on its own."""
    ident = read_identity(issue(pki, "coordinator", role="coordinator").cert)
    assert ident.hosts == ("localhost", "coordinator.fedseek.fedseek.internal", "127.0.0.1")  # DNS names, then IPs
    assert read_identity(issue(pki, "site-a", role="node").cert).hosts == ("127.0.0.1",)
    assert read_identity(issue(pki, "rita", role="reviewer").cert).hosts == ()
    assert read_identity(issue(pki, "olga", role="admin").cert).hosts == ()
