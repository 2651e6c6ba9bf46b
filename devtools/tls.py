"""A throwaway certificate authority for the secured local stack (``make up SECURE=1``).

The secured stack speaks TLS to Kafka and to both PostgreSQL clusters; its clients check the
servers against this CA (``sslmode=verify-full``, ``ssl.ca.location``). Keys and certificates
are made with the ``cryptography`` library (no hand-rolled crypto) and written as PEM files,
which both Kafka (``ssl.keystore.type=PEM``) and PostgreSQL read. Everything here is for a
loopback sandbox: one-year certificates, 2048-bit RSA keys, names ``127.0.0.1`` and ``localhost``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_LIFETIME = dt.timedelta(days=365)
_LOOPBACK_NAMES: tuple[x509.GeneralName, ...] = (
    x509.DNSName("localhost"),
    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
)


@dataclass(frozen=True, slots=True)
class Issued:
    """A certificate and its private key, as PEM files."""

    cert: Path
    key: Path


@dataclass(frozen=True, slots=True)
class CertificateAuthority:
    """The stack's CA: ``cert`` is what clients trust; ``key`` signs the servers' certificates."""

    cert: Path
    key: Path


def _new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _write_key(key: rsa.RSAPrivateKey, path: Path) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # 0600 from the start: PostgreSQL refuses a server key others can read.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(pem)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "kafka-cutover local stack"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def make_ca(folder: Path) -> CertificateAuthority:
    """Create a new CA in ``folder`` (``ca.crt``, ``ca.key``), replacing any there."""
    folder.mkdir(parents=True, exist_ok=True)
    key = _new_key()
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("kafka-cutover local CA"))
        .issuer_name(_name("kafka-cutover local CA"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + _LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    ca = CertificateAuthority(cert=folder / "ca.crt", key=folder / "ca.key")
    ca.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key, ca.key)
    return ca


def issue(ca: CertificateAuthority, folder: Path, name: str, *, client: bool = False) -> Issued:
    """Issue ``<name>.crt``/``<name>.key`` in ``folder``, signed by ``ca``, for the loopback names.

    ``client=True`` also allows the certificate for client authentication (mutual TLS).
    """
    folder.mkdir(parents=True, exist_ok=True)
    ca_cert = x509.load_pem_x509_certificate(ca.cert.read_bytes())
    ca_key = serialization.load_pem_private_key(ca.key.read_bytes(), password=None)
    if not isinstance(ca_key, rsa.RSAPrivateKey):
        raise TypeError(f"{ca.key}: not an RSA key")
    key = _new_key()
    now = dt.datetime.now(dt.UTC)
    usages = [ExtendedKeyUsageOID.SERVER_AUTH]
    if client:
        usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + _LIFETIME)
        .add_extension(x509.SubjectAlternativeName(list(_LOOPBACK_NAMES)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    issued = Issued(cert=folder / f"{name}.crt", key=folder / f"{name}.key")
    issued.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key, issued.key)
    return issued
