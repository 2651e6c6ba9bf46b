"""The secured stack's throwaway CA: a server certificate it issues verifies against it."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature

from devtools.tls import issue, make_ca


def test_issued_certificate_verifies_against_the_ca_and_keys_are_private(tmp_path: Path) -> None:
    ca = make_ca(tmp_path / "ca")
    server = issue(ca, tmp_path / "certs", "kafka")
    assert server.key.stat().st_mode & 0o077 == 0
    assert ca.key.stat().st_mode & 0o077 == 0
    # The standard library's TLS stack loads the pair and trusts it through the CA only.
    ctx = ssl.create_default_context(cafile=str(ca.cert))
    ctx.load_cert_chain(str(server.cert), str(server.key))
    cert = ssl._ssl._test_decode_cert(str(server.cert))  # type: ignore[attr-defined]
    assert ("IP Address", "127.0.0.1") in cert["subjectAltName"]
    assert ("DNS", "localhost") in cert["subjectAltName"]


def test_a_certificate_from_another_ca_is_not_trusted(tmp_path: Path) -> None:
    ca = make_ca(tmp_path / "ca")
    ours = issue(ca, tmp_path / "certs", "ours")
    stranger = issue(make_ca(tmp_path / "other"), tmp_path / "certs", "stranger")
    ca_cert = x509.load_pem_x509_certificate(ca.cert.read_bytes())
    x509.load_pem_x509_certificate(ours.cert.read_bytes()).verify_directly_issued_by(ca_cert)
    with pytest.raises(InvalidSignature):
        x509.load_pem_x509_certificate(stranger.cert.read_bytes()).verify_directly_issued_by(
            ca_cert
        )
