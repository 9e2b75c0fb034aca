"""The federation's TLS PKI: a CA, the coordinator's server certificate, one client certificate
per enterprise, certificate signing requests, and the ``ssl`` contexts for mutual TLS.

Enrolment (:mod:`secfed.transport.enrol`): each party makes its own TLS key and sends a CSR
(:func:`make_csr`); the admin checks it (:func:`load_csr`) and signs the public key it carries
(:func:`issue_from_csr`), so the CA's holder never sees a party's TLS private key.

TLS keys are ECDSA P-256 (every OpenSSL build Python links supports them for TLS 1.2/1.3; Ed25519
certificates are not accepted by all TLS stacks). Identity *signing* keys stay Ed25519 and are a
separate key pair (:mod:`secfed.crypto.keys`). The enterprise id is the client certificate's CN and
its only SAN (a DNS name), so the coordinator reads the identity from the verified certificate.
"""

from __future__ import annotations

import ctypes
import datetime as dt
import ipaddress
import os
import ssl
from collections.abc import Callable
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
    "new_tls_key",
    "private_key_pem",
    "load_tls_key",
    "make_csr",
    "load_csr",
    "issue_from_csr",
    "server_names",
    "write_private_pem",
    "server_ssl_context",
    "client_ssl_context",
    "ReloadingServerContext",
    "peer_identity",
    "check_not_expired",
    "TLS13_CIPHER_SUITES",
    "TLS_GROUPS",
    "DEFAULT_LEAF_VALIDITY",
]

DEFAULT_VALIDITY = dt.timedelta(days=365)  # the federation CA
#: Leaf (server and client) certificates: Mozilla's "modern" profile caps a leaf at 90 days;
#: ``secfed federation renew`` issues fresh ones from the same CA before they run out.
DEFAULT_LEAF_VALIDITY = dt.timedelta(days=90)
#: Both ends are ours, so TLS 1.3 only, with its AEAD suites (RFC 8446 B.4; Mozilla "modern").
TLS13_CIPHER_SUITES = ("TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384",
                       "TLS_CHACHA20_POLY1305_SHA256")
#: Key exchange groups offered and accepted: X25519 first, P-256 for FIPS-minded stacks; no
#: X448, P-384 or P-521 (OpenSSL's defaults offer them).
TLS_GROUPS = ("X25519", "P-256")
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
    not_before: dt.datetime | None,
    not_after: dt.datetime | None,
) -> bytes:
    """A leaf certificate (PEM) for ``public_key``, signed by the CA."""
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


def _issue(
    ca: CertifiedKey,
    *,
    common_name: str,
    sans: list[x509.GeneralName],
    usage: x509.ObjectIdentifier,
    not_before: dt.datetime | None,
    not_after: dt.datetime | None,
) -> CertifiedKey:
    """A fresh key pair and its certificate (tests and tools that play every part themselves)."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert_pem = _sign_leaf(ca, key.public_key(), common_name=common_name, sans=sans, usage=usage,
                          not_before=not_before, not_after=not_after)
    return CertifiedKey(_key_pem(key), cert_pem)


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
    names = server_names(host)
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
    return _sign_leaf(ca, public_key, common_name=common_name, sans=sans, usage=usage,
                      not_before=None, not_after=None)


def write_private_pem(path: Path, data: bytes) -> None:
    """Write a secret file created with mode 0600 (never world-readable, not even briefly)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_MODE)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, PRIVATE_MODE)


# ---------------------------------------------------------------- TLS contexts

_SSL_CTRL_SET_GROUPS_LIST = 92  # OpenSSL: SSL_CTX_set1_groups_list is this SSL_CTX_ctrl
_SSL_CTRL_GET_MAX_PROTO_VERSION = 131
_TLS1_3_VERSION = 0x0304


def _openssl_ctx(ctx: ssl.SSLContext) -> tuple[ctypes.CDLL, int]:
    """The ``SSL_CTX *`` behind ``ctx`` and the OpenSSL library ``_ssl`` is linked to.

    Python < 3.15 has no API for the key exchange groups or the TLS 1.3 suites, so they are set
    through OpenSSL itself. The pointer is the first field after the object header; it is
    checked against two settings read back from OpenSSL before anything is written through it.

    Raises:
        ConfigError: the pointer does not read back the context's own settings.
    """
    import _ssl

    lib = ctypes.CDLL(_ssl.__file__)  # dlsym searches _ssl's dependencies: libssl
    lib.SSL_CTX_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
    lib.SSL_CTX_ctrl.restype = ctypes.c_long
    lib.SSL_CTX_get_verify_mode.argtypes = [ctypes.c_void_p]
    lib.SSL_CTX_get_verify_mode.restype = ctypes.c_int
    lib.SSL_CTX_set_ciphersuites.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.SSL_CTX_set_ciphersuites.restype = ctypes.c_int
    pointer = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    openssl_verify = {ssl.CERT_NONE: 0, ssl.CERT_OPTIONAL: 1, ssl.CERT_REQUIRED: 3}
    if (not pointer
            or lib.SSL_CTX_get_verify_mode(pointer) != openssl_verify[ctx.verify_mode]
            or lib.SSL_CTX_ctrl(pointer, _SSL_CTRL_GET_MAX_PROTO_VERSION, 0, None)
            != _TLS1_3_VERSION):
        raise ConfigError("TLS context must expose its OpenSSL SSL_CTX (layout not recognised)")
    return lib, pointer


def _tls13_only(ctx: ssl.SSLContext) -> ssl.SSLContext:
    """TLS 1.3 only, its AEAD suites (:data:`TLS13_CIPHER_SUITES`), groups :data:`TLS_GROUPS`,
    no compression, no session tickets (each connection is a full handshake, so a renewed
    certificate or a revocation applies to the very next connection).

    Raises:
        ConfigError: OpenSSL refuses the suites or groups.
    """
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_TICKET
    lib, pointer = _openssl_ctx(ctx)
    if lib.SSL_CTX_set_ciphersuites(pointer, ":".join(TLS13_CIPHER_SUITES).encode()) != 1:
        raise ConfigError(f"TLS 1.3 suites must be accepted by OpenSSL (got {TLS13_CIPHER_SUITES})")
    groups = ctypes.c_char_p(":".join(TLS_GROUPS).encode())
    if lib.SSL_CTX_ctrl(pointer, _SSL_CTRL_SET_GROUPS_LIST, 0,
                        ctypes.cast(groups, ctypes.c_void_p)) != 1:
        raise ConfigError(f"TLS groups must be accepted by OpenSSL (got {TLS_GROUPS})")
    return ctx


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


def server_ssl_context(*, cert: Path, key: Path, ca: Path, crl: Path | None = None) -> ssl.SSLContext:
    """Server side of mutual TLS: TLS 1.3 only (:func:`_tls13_only`), a client certificate from
    the federation CA required and, when ``crl`` exists, checked against the CA's revocation
    list (a revoked certificate fails the handshake)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.verify_mode = ssl.CERT_REQUIRED
    _tls13_only(ctx)
    ctx.load_cert_chain(str(cert), str(key))
    ctx.load_verify_locations(cafile=str(ca))
    if crl is not None and crl.is_file():
        ctx.load_verify_locations(cafile=str(crl))
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    return ctx


def client_ssl_context(*, cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    """Client side: TLS 1.3 only, pins the federation CA (no system roots), presents the
    enterprise cert."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    _tls13_only(ctx)
    ctx.load_verify_locations(cafile=str(ca))
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


class _AlertBeforeClose:
    """An ``SSLObject`` whose failed handshake lets its TLS alert leave before the close.

    asyncio's TLS transport (3.11) drops the connection as soon as ``do_handshake`` raises,
    with OpenSSL's alert still in the outgoing buffer: the peer sees a reset instead of
    "protocol version", "certificate revoked" or "certificate expired". Here the first failure
    is reported as "want read", which makes the transport send what is buffered (the alert)
    and wait; the peer closes on the alert, or the next call raises the stored error.
    """

    def __init__(self, inner: ssl.SSLObject, outgoing: ssl.MemoryBIO):
        self._inner = inner
        self._outgoing = outgoing
        self._failure: ssl.SSLError | None = None

    def do_handshake(self) -> None:
        if self._failure is not None:
            raise self._failure
        try:
            self._inner.do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise
        except ssl.SSLError as exc:
            if not self._outgoing.pending:
                raise
            self._failure = exc
            raise ssl.SSLWantReadError("handshake failed; sending the alert first") from None

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)


class ReloadingServerContext(ssl.SSLContext):
    """The server's TLS context, rebuilt when its files change: a renewed certificate or a new
    revocation list applies from the next connection on, without a restart.

    asyncio's TLS transport calls :meth:`wrap_bio` once per accepted connection; each call looks
    at the files (four ``stat``s) and, when one changed, builds a fresh
    :func:`server_ssl_context` and uses it from then on. Connections already open keep the
    context they were made with, so no round in flight is disturbed. A half-written or broken
    file set keeps the previous context (``on_reload`` hears about it) until it is whole.
    """

    def __new__(cls, *, cert: Path, key: Path, ca: Path, crl: Path | None = None,
                on_reload: Callable[[str], None] | None = None) -> ReloadingServerContext:
        return super().__new__(cls, ssl.PROTOCOL_TLS_SERVER)

    def __init__(self, *, cert: Path, key: Path, ca: Path, crl: Path | None = None,
                 on_reload: Callable[[str], None] | None = None) -> None:
        self._files = (Path(cert), Path(key), Path(ca), Path(crl) if crl else None)
        self._on_reload = on_reload or (lambda _msg: None)
        self._signature = self._stat()
        self._current = server_ssl_context(cert=Path(cert), key=Path(key), ca=Path(ca),
                                           crl=self._files[3])
        self.verify_mode = ssl.CERT_REQUIRED  # what this object says matches what it serves
        _tls13_only(self)

    def _stat(self) -> tuple[tuple[int, int, int] | None, ...]:
        out: list[tuple[int, int, int] | None] = []
        for path in self._files:
            try:
                st = path.stat() if path is not None else None
            except OSError:
                st = None
            out.append((st.st_mtime_ns, st.st_size, st.st_ino) if st else None)
        return tuple(out)

    def refresh(self) -> ssl.SSLContext:
        """The context for the next connection: rebuilt first if a file changed."""
        signature = self._stat()
        if signature != self._signature:
            cert, key, ca, crl = self._files
            try:
                fresh = server_ssl_context(cert=cert, key=key, ca=ca, crl=crl)
            except (OSError, ssl.SSLError, ConfigError) as exc:
                self._on_reload(f"TLS files changed but do not load yet ({exc}); keeping the "
                                "previous certificate")
            else:
                self._current, self._signature = fresh, signature
                self._on_reload(f"TLS context reloaded from {cert.parent}")
        return self._current

    def wrap_bio(self, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO,  # type: ignore[override]
                 server_side: bool = False, server_hostname: str | None = None,
                 session: ssl.SSLSession | None = None) -> ssl.SSLObject:
        inner = self.refresh().wrap_bio(incoming, outgoing, server_side=server_side,
                                        server_hostname=server_hostname, session=session)
        return _AlertBeforeClose(inner, outgoing)  # type: ignore[return-value]

    def wrap_socket(self, *args: object, **kwargs: object) -> ssl.SSLSocket:  # type: ignore[override]
        return self.refresh().wrap_socket(*args, **kwargs)  # type: ignore[arg-type]


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
