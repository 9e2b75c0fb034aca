"""The federation's TLS PKI: a CA, the coordinator's server certificate, one client certificate
per enterprise, certificate signing requests and expiry checks. The ``ssl`` contexts that use
these certificates are the transport's (:mod:`secfed.transport.tls`).

Enrolment (:mod:`secfed.federation.enrol`): each party makes its own TLS key and sends a CSR
(:func:`make_csr`); the admin checks it (:func:`load_csr`) and signs the public key it carries
(:func:`issue_from_csr`), so the CA's holder never sees a party's TLS private key.

TLS keys are ECDSA P-256 (every OpenSSL build Python links supports them for TLS 1.2/1.3; Ed25519
certificates are not accepted by all TLS stacks). Identity *signing* keys stay Ed25519 and are a
separate key pair (:mod:`secfed.crypto.keys`). The enterprise id is the client certificate's CN and
its only SAN (a DNS name), so the coordinator reads the identity from the verified certificate.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from secfed.errors import ConfigError

__all__ = [
    "CertifiedKey",
    "make_ca",
    "issue_server_cert",
    "issue_client_cert",
    "new_tls_key",
    "private_key_pem",
    "load_tls_key",
    "make_csr",
    "load_csr",
    "issue_from_csr",
    "server_names",
    "write_private_pem",
    "check_not_expired",
    "DEFAULT_LEAF_VALIDITY",
]

DEFAULT_VALIDITY = dt.timedelta(days=365)  # the federation CA
#: Leaf (server and client) certificates: Mozilla's "modern" profile caps a leaf at 90 days;
#: ``secfed federation renew`` issues fresh ones from the same CA before they run out.
DEFAULT_LEAF_VALIDITY = dt.timedelta(days=90)
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


def _sign_leaf(
    ca: CertifiedKey,
    public_key: ec.EllipticCurvePublicKey,
    *,
    common_name: str,
    sans: list[x509.GeneralName],
    usage: x509.ObjectIdentifier,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> bytes:
    """A leaf certificate (PEM) for ``public_key``, signed by the CA (valid from five minutes
    ago for :data:`DEFAULT_LEAF_VALIDITY` unless ``not_before`` / ``not_after`` say)."""
    ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ConfigError("CA key must be an ECDSA key (got another key type)")
    ca_cert = ca.certificate
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - dt.timedelta(minutes=5))
        .not_valid_after(not_after or now + DEFAULT_LEAF_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def server_names(host: str) -> list[x509.GeneralName]:
    """The coordinator certificate's SANs: ``host``, localhost and 127.0.0.1."""
    names: list[x509.GeneralName] = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
        if x509.IPAddress(ip) not in names:
            names.append(x509.IPAddress(ip))
    except ValueError:
        if host != "localhost":
            names.append(x509.DNSName(host))
    return names


def issue_server_cert(ca: CertifiedKey, host: str) -> CertifiedKey:
    """The coordinator's server certificate: SANs for ``host``, localhost and 127.0.0.1."""
    key = new_tls_key()
    cert_pem = _sign_leaf(ca, key.public_key(), common_name=host, sans=server_names(host),
                          usage=ExtendedKeyUsageOID.SERVER_AUTH)
    return CertifiedKey(_key_pem(key), cert_pem)


def issue_client_cert(
    ca: CertifiedKey,
    enterprise_id: str,
    *,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> CertifiedKey:
    """An enterprise's client certificate: CN and the only DNS SAN are its enterprise id."""
    key = new_tls_key()
    cert_pem = _sign_leaf(ca, key.public_key(), common_name=enterprise_id,
                          sans=[x509.DNSName(enterprise_id)], usage=ExtendedKeyUsageOID.CLIENT_AUTH,
                          not_before=not_before, not_after=not_after)
    return CertifiedKey(_key_pem(key), cert_pem)


def new_tls_key() -> ec.EllipticCurvePrivateKey:
    """A fresh TLS key (ECDSA P-256), made by the party that will hold it."""
    return ec.generate_private_key(ec.SECP256R1())


def private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """PKCS#8 PEM of a TLS key (unencrypted: the file is written 0600)."""
    return _key_pem(key)


def load_tls_key(pem: bytes) -> ec.EllipticCurvePrivateKey:
    """A TLS key written by :func:`private_key_pem`.

    Raises:
        ConfigError: not a PEM private key, or not ECDSA P-256.
    """
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError("TLS key must be an unencrypted PEM private key (unreadable)") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ConfigError(f"TLS key must be ECDSA P-256 (got {type(key).__name__})")
    return key


def make_csr(key: ec.EllipticCurvePrivateKey, common_name: str,
             sans: list[x509.GeneralName]) -> bytes:
    """A certificate signing request (DER) for ``key``, signed by ``key`` itself."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.DER)


def load_csr(der: bytes, *, who: str, common_name: str,
             sans: list[x509.GeneralName] | None) -> ec.EllipticCurvePublicKey:
    """Check a CSR and return the public key it asks to certify.

    The CSR must parse, carry a valid self-signature (proof that its sender holds the key), hold
    an ECDSA P-256 key, name exactly ``common_name`` as its CN and, when ``sans`` is given, ask
    for exactly those SANs. ``who`` names the request in error messages.

    Raises:
        ConfigError: the first rule it breaks, naming the field and the value received.
    """
    try:
        csr = x509.load_der_x509_csr(der)
    except ValueError as exc:
        raise ConfigError(f"{who}: csr must be a DER certificate signing request (unparseable)") from exc
    if not csr.is_signature_valid:
        raise ConfigError(f"{who}: csr signature must verify under its own key (invalid)")
    try:
        key = csr.public_key()
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{who}: csr key must be ECDSA P-256 (unsupported key)") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        curve = getattr(getattr(key, "curve", None), "name", "")
        raise ConfigError(
            f"{who}: csr key must be ECDSA P-256 (got {type(key).__name__} {curve}".rstrip() + ")"
        )
    cns = [str(a.value) for a in csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if cns != [common_name]:
        raise ConfigError(f"{who}: csr CN must be {common_name!r} (got {cns})")
    if sans is not None:
        try:
            ext = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
            got = list(ext.value)
        except x509.ExtensionNotFound:
            got = []
        if got != sans:
            raise ConfigError(
                f"{who}: csr SAN must be exactly {[n.value for n in sans]} "
                f"(got {[n.value for n in got]})"
            )
    return key


def issue_from_csr(ca: CertifiedKey, public_key: ec.EllipticCurvePublicKey, *, common_name: str,
                   sans: list[x509.GeneralName], server: bool) -> bytes:
    """A certificate (PEM) for a key checked by :func:`load_csr`: names and usage come from the
    admin's own rules (``common_name``, ``sans``), never copied from the request."""
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    return _sign_leaf(ca, public_key, common_name=common_name, sans=sans, usage=usage)


def write_private_pem(path: Path, data: bytes) -> None:
    """Write a secret file created with mode 0600 (never world-readable, not even briefly)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_MODE)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, PRIVATE_MODE)


def check_not_expired(cert: Path, *, what: str, renew: str,
                      now: dt.datetime | None = None) -> x509.Certificate:
    """Refuse a certificate past its ``notAfter`` (or not valid yet) with one line that names
    the date and the command that renews it.

    Raises:
        ConfigError: unreadable, expired or not yet valid.
    """
    try:
        certificate = x509.load_pem_x509_certificate(Path(cert).read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{what} {cert} must be a readable PEM certificate ({exc})") from None
    moment = now or _now()
    if moment > certificate.not_valid_after_utc:
        raise ConfigError(
            f"{what} {cert} must be valid now (expired on "
            f"{certificate.not_valid_after_utc:%Y-%m-%d %H:%M} UTC); renew it with: {renew}"
        )
    if moment < certificate.not_valid_before_utc:
        raise ConfigError(
            f"{what} {cert} must be valid now (not valid before "
            f"{certificate.not_valid_before_utc:%Y-%m-%d %H:%M} UTC; check this machine's clock)"
        )
    return certificate
