"""Certificate requests signed by the CA under its own policy, and the CRL refreshed only when due."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from federation.security.pki import (
    PKIError,
    build_request,
    coordinator_host,
    issue,
    list_issued,
    load_crl,
    read_identity,
    refresh_crl,
    renew,
    renewal_proof,
    request_pem,
    sign_request,
    write_crl,
)
from federation.security.pki.clock import utcnow
from federation.security.pki.index import load_index
from tests.federation.security.pki.support import snapshot


def _request(
    tmp_path: Path, name: str, key: ec.EllipticCurvePrivateKey | None = None
) -> tuple[Path, ec.EllipticCurvePrivateKey]:
    key = key or ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / f"{name}-{id(key)}.csr"
    path.write_bytes(request_pem(build_request(key, name)))
    return path, key


def test_a_request_is_signed_without_the_party_key_reaching_the_ca(pki: Path, tmp_path: Path) -> None:
    csr, key = _request(tmp_path, "site-a")
    signed = sign_request(pki, csr, role="node", hosts=["site-a.example"])
    assert signed.leaf.cert.parent == pki / "site-a" and not signed.renewal
    cert = x509.load_pem_x509_certificate(signed.leaf.cert.read_bytes())
    assert cert.public_key() == key.public_key()
    assert sorted(p.name for p in (pki / "site-a").iterdir()) == ["ca.pem", "cert.pem", "crl.pem", "publishers.json"]
    secret = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    scalar = key.private_numbers().private_value.to_bytes(32, "big")
    for path in pki.rglob("*"):
        if path.is_file():
            assert secret not in path.read_bytes() and scalar not in path.read_bytes(), path
    assert [r.name for r in load_index(pki / "ca").records] == ["site-a"]


def test_a_request_with_a_bad_signature_is_refused(pki: Path, tmp_path: Path) -> None:
    csr, _ = _request(tmp_path, "site-a")
    der = bytearray(x509.load_pem_x509_csr(csr.read_bytes()).public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01  # the last byte of the ECDSA signature: still DER, no longer a signature of the body
    bad = x509.load_der_x509_csr(bytes(der))
    csr.write_bytes(bad.public_bytes(serialization.Encoding.PEM))
    before = snapshot(pki)
    with pytest.raises(PKIError, match="not signed by its own key"):
        sign_request(pki, csr, role="node")
    assert snapshot(pki) == before


def test_a_request_for_a_name_held_by_another_party_is_refused(pki: Path, tmp_path: Path) -> None:
    issue(pki, "coordinator", role="coordinator", hosts=["coord.example"])
    sign_request(pki, _request(tmp_path, "site-b")[0], role="node")
    before = snapshot(pki)
    csr, _ = _request(tmp_path, "coordinator")
    with pytest.raises(PKIError, match="may not turn it into a node"):
        sign_request(pki, csr, role="node")
    with pytest.raises(PKIError, match="not from its holder"):
        sign_request(pki, csr, role="coordinator")
    thief_csr, thief = _request(tmp_path, "site-b")
    forged = renewal_proof(thief, x509.load_pem_x509_csr(thief_csr.read_bytes()))  # signed by the wrong key
    with pytest.raises(PKIError, match=r"renewal proof .* is not signed by its key"):
        sign_request(pki, thief_csr, role="node", proof=forged)
    # The coordinator's role name stays the coordinator's, whoever asks the CA operator for it.
    with pytest.raises(PKIError, match="role name"):
        sign_request(pki, _request(tmp_path, "site-c")[0], role="node", hosts=[coordinator_host("fedseek")])
    assert snapshot(pki) == before


def test_what_a_request_asks_for_is_not_what_it_gets(pki: Path, tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    greedy = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.COMMON_NAME, "site-a"),
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "other-consortium"),
                    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "coordinator"),
                ]
            )
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("bank.example"), x509.DNSName(coordinator_host("fedseek"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    csr = tmp_path / "greedy.csr"
    csr.write_bytes(request_pem(greedy))
    signed = sign_request(pki, csr, role="node", hosts=["site-a.example"])
    cert = x509.load_pem_x509_certificate(signed.leaf.cert.read_bytes())
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and not ku.key_cert_sign and not ku.crl_sign
    ident = read_identity(signed.leaf.cert)
    assert (ident.role, ident.consortium, sorted(ident.hosts)) == ("node", "fedseek", ["127.0.0.1", "site-a.example"])
    assert "CA:TRUE" in signed.ignored
    assert "subjectAltName bank.example" in signed.ignored
    assert f"subjectAltName {coordinator_host('fedseek')}" in signed.ignored


def test_renewal_needs_the_current_key_and_supersedes_the_certificate(pki: Path, tmp_path: Path) -> None:
    first_csr, first_key = _request(tmp_path, "site-a")
    first = read_identity(sign_request(pki, first_csr, role="node", hosts=["site-a.example"]).leaf.cert)
    # A new key, vouched for by the current one: the hosts carry over, the new certificate replaces the bundle.
    new_csr, new_key = _request(tmp_path, "site-a")
    proof = renewal_proof(first_key, x509.load_pem_x509_csr(new_csr.read_bytes()))
    renewed = sign_request(pki, new_csr, role="node", proof=proof)
    assert renewed.renewal and renewed.identity.serial != first.serial
    assert sorted(renewed.identity.hosts) == ["127.0.0.1", "site-a.example"]
    assert [i.serial for i in list_issued(pki)] == [renewed.identity.serial]
    assert {r.serial for r in load_index(pki / "ca").records} == {first.serial, renewed.identity.serial}
    # The old key no longer vouches: only the current certificate's key does.
    stale_csr, _ = _request(tmp_path, "site-a")
    stale = renewal_proof(first_key, x509.load_pem_x509_csr(stale_csr.read_bytes()))
    with pytest.raises(PKIError, match="not signed by its key"):
        sign_request(pki, stale_csr, role="node", proof=stale)
    # Keeping the key: the request's own signature is the proof.
    kept = sign_request(pki, _request(tmp_path, "site-a", new_key)[0], role="node")
    assert (
        kept.renewal
        and x509.load_pem_x509_certificate(kept.leaf.cert.read_bytes()).public_key() == new_key.public_key()
    )


def test_the_crl_is_refreshed_only_when_due(pki: Path) -> None:
    issue(pki, "site-a", role="node")
    crl_path = pki / "ca" / "crl.pem"
    before = crl_path.read_bytes()
    assert refresh_crl(pki, within=timedelta(days=2)) is None  # fresh: 7 days left
    assert crl_path.read_bytes() == before
    write_crl(pki, days=1)  # as if five days had passed: one day left
    number = load_crl(crl_path).extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    until = refresh_crl(pki, within=timedelta(days=2))
    assert until is not None and until - utcnow() > timedelta(days=6)
    crl = load_crl(crl_path)
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == number + 1
    assert (pki / "site-a" / "crl.pem").read_bytes() == crl_path.read_bytes()  # published to the party too
    with pytest.raises(PKIError, match="every run"):
        refresh_crl(pki, within=timedelta(days=7))


def test_an_enrolled_party_is_not_renewed_with_a_key_made_here(pki: Path, tmp_path: Path) -> None:
    """`ca renew` would make the party a new key at the CA: an enrolled party renews by request instead."""
    sign_request(pki, _request(tmp_path, "site-a")[0], role="node")
    before = snapshot(pki)
    with pytest.raises(PKIError, match="node enroll --renew"):
        renew(pki, "site-a")
    assert snapshot(pki) == before
