"""The federation's TLS PKI: a CA, the coordinator's server certificate, one client certificate
per enterprise, and the ``ssl`` contexts for mutual TLS.

TLS keys are ECDSA P-256 (every OpenSSL build Python links supports them for TLS 1.2/1.3; Ed25519
certificates are not accepted by all TLS stacks). Identity *signing* keys stay Ed25519 and are a
separate key pair (:mod:`secfed.crypto.keys`). The enterprise id is the client certificate's CN and
its only SAN (a DNS name), so the coordinator reads the identity from the verified certificate.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from secfed.crypto.errors import ConfigError, TransportError

__all__ = [
    "CertifiedKey",
    "make_ca",
    "issue_server_cert",
    "issue_client_cert",
    "write_private_pem",
    "server_ssl_context",
    "client_ssl_context",
    "peer_identity",
]

DEFAULT_VALIDITY = dt.timedelta(days=365)
PRIVATE_MODE = 0o600


@dataclass(frozen=True)
class CertifiedKey:
    """A private key and its certificate (PEM)."""

    key_pem: bytes
    cert_pem: bytes

    def __repr__(self) -> str:  # never print the key
        return "CertifiedKey(<private key>, cert)"

    @property
    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_pem)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def make_ca(name: str, *, validity: dt.timedelta = DEFAULT_VALIDITY) -> CertifiedKey:
    """A self-signed federation CA (path length 0: it signs leaf certificates only)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, f"secfed federation {name}"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{name} federation CA"),
        ]
    )
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + validity)
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return CertifiedKey(_key_pem(key), cert.public_bytes(serialization.Encoding.PEM))


def _issue(
    ca: CertifiedKey,
    *,
    common_name: str,
    sans: list[x509.GeneralName],
    usage: x509.ObjectIdentifier,
    not_before: dt.datetime | None,
    not_after: dt.datetime | None,
) -> CertifiedKey:
    ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ConfigError("CA key must be an ECDSA key (got another key type)")
    ca_cert = ca.certificate
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - dt.timedelta(minutes=5))
        .not_valid_after(not_after or now + DEFAULT_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return CertifiedKey(_key_pem(key), cert.public_bytes(serialization.Encoding.PEM))


def issue_server_cert(ca: CertifiedKey, host: str) -> CertifiedKey:
    """The coordinator's server certificate: SANs for ``host``, localhost and 127.0.0.1."""
    names: list[x509.GeneralName] = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
        if x509.IPAddress(ip) not in names:
            names.append(x509.IPAddress(ip))
    except ValueError:
        if host != "localhost":
            names.append(x509.DNSName(host))
    return _issue(
        ca,
        common_name=host,
        sans=names,
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
        not_before=None,
        not_after=None,
    )


def issue_client_cert(
    ca: CertifiedKey,
    enterprise_id: str,
    *,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> CertifiedKey:
    """An enterprise's client certificate: CN and the only DNS SAN are its enterprise id."""
    return _issue(
        ca,
        common_name=enterprise_id,
        sans=[x509.DNSName(enterprise_id)],
        usage=ExtendedKeyUsageOID.CLIENT_AUTH,
        not_before=not_before,
        not_after=not_after,
    )


def write_private_pem(path: Path, data: bytes) -> None:
    """Write a secret file created with mode 0600 (never world-readable, not even briefly)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_MODE)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, PRIVATE_MODE)


def server_ssl_context(*, cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    """Server side of mutual TLS: TLS >= 1.2, client certificate from the federation CA required."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert), str(key))
    ctx.load_verify_locations(cafile=str(ca))
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_ssl_context(*, cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    """Client side: pins the federation CA (no system roots), presents the enterprise cert."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cafile=str(ca))
    ctx.load_cert_chain(str(cert), str(key))
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def peer_identity(peercert: dict | None) -> str:
    """The enterprise id from a *verified* peer certificate (``SSLObject.getpeercert()``).

    Raises:
        TransportError: no certificate, or CN and DNS SAN disagree / are missing.
    """
    if not peercert:
        raise TransportError("client certificate must be presented (got none)")
    cns = [v for rdn in peercert.get("subject", ()) for (k, v) in rdn if k == "commonName"]
    sans = [v for (k, v) in peercert.get("subjectAltName", ()) if k == "DNS"]
    if len(cns) != 1 or sans != cns:
        raise TransportError("client certificate must carry one CN equal to its only DNS SAN")
    return cns[0]
