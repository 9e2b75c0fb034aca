"""The ``ssl`` contexts for mutual TLS between sites and the coordinator: TLS 1.3 only with its
AEAD suites and the X25519/P-256 groups (Mozilla "modern"), the federation CA pinned, a client
certificate required and checked against the revocation list, and a server context that reloads
renewed certificates without a restart. The certificates themselves come from
:mod:`secfed.federation.pki`.
"""

from __future__ import annotations

import ctypes
import ssl
from collections.abc import Callable
from pathlib import Path

from secfed.errors import ConfigError, TransportError

__all__ = [
    "server_ssl_context",
    "client_ssl_context",
    "ReloadingServerContext",
    "peer_identity",
    "TLS13_CIPHER_SUITES",
    "TLS_GROUPS",
]

#: Both ends are ours, so TLS 1.3 only, with its AEAD suites (RFC 8446 B.4; Mozilla "modern").
TLS13_CIPHER_SUITES = ("TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384",
                       "TLS_CHACHA20_POLY1305_SHA256")
#: Key exchange groups offered and accepted: X25519 first, P-256 for FIPS-minded stacks; no
#: X448, P-384 or P-521 (OpenSSL's defaults offer them).
TLS_GROUPS = ("X25519", "P-256")


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
