"""The enterprise side of the transport: an httpx client with mutual TLS and retries.

It pins the federation CA (no system roots), presents the enterprise's client certificate, puts
a timeout on every call, and retries connection failures and 5xx answers with capped
exponential backoff and jitter until ``retry_for`` seconds have passed, so a coordinator restart
is ridden out. A call given ``until`` (a :func:`time.monotonic` instant: the stage's deadline as
the participant bounds it) ends by then whatever the network does: its long poll is shortened
to answer before it, each attempt's connect/read/write timeouts are cut to the time left (a
stalled connection blocks no longer) and the retries stop there. Uploads are idempotent on the server side (same bytes -> same acknowledgement), so
retrying a POST whose answer was lost is safe. Typed errors from the server are raised again as
the same :mod:`secfed.errors` class.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import httpcore
import httpx

from secfed.errors import TransportError
from secfed.federation.lifecycle import renew_command
from secfed.federation.pki import check_not_expired
from secfed.transport.api import (
    AppliedConfirmation,
    Envelope,
    ErrorBody,
    RoundInfo,
    RoundOutcome,
    RoundRefusal,
    SiteReady,
    SubmitAck,
    error_from_body,
)
from secfed.transport.tls import client_ssl_context

__all__ = ["CoordinatorClient", "CoordinatorUnreachable", "check_client_certificate"]

RETRY_STATUSES = frozenset({500, 502, 503, 504})
ANSWER_S = 2.0  # a long poll asked with ``until`` ends this long before it (time to answer)
REFUSAL_RETRY_S = 5.0  # a refusal is best effort: the refusing site does not wait long for it
COALESCE_BYTES = 64 * 1024  # request writes up to this size wait for the rest of the request


class CoordinatorUnreachable(TransportError):
    """No answer within the call's retries (``retry_for``, or before its ``until``); a refusal
    (TLS, allow-list) is a plain :class:`TransportError` and is never retried."""


class _CoalescingStream(httpcore.NetworkStream):
    """A connection that sends a request's head and body as one TLS write.

    httpcore writes the head, the body and the end of the message separately; over TLS on
    loopback each write is a record and a ``send`` that wakes the server (about 0.2 ms apiece on
    this machine's VM). Writes are held until the first read (a request is always written in
    full before its response is read) or until :data:`COALESCE_BYTES` are pending.
    """

    def __init__(self, inner: httpcore.NetworkStream):
        self._inner = inner
        self._pending: list[bytes] = []
        self._size = 0

    def _send(self, timeout: float | None) -> None:
        data = b"".join(self._pending)
        self._pending.clear()
        self._size = 0
        self._inner.write(data, timeout)

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if buffer:
            self._pending.append(buffer)
            self._size += len(buffer)
            if self._size > COALESCE_BYTES:
                self._send(timeout)

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        if self._pending:
            self._send(timeout)
        return self._inner.read(max_bytes, timeout)

    def close(self) -> None:
        self._pending.clear()
        self._inner.close()

    def start_tls(self, ssl_context: Any, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        return _CoalescingStream(self._inner.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _CoalescingBackend(httpcore.SyncBackend):
    def connect_tcp(self, *args: Any, **kwargs: Any) -> httpcore.NetworkStream:
        return _CoalescingStream(super().connect_tcp(*args, **kwargs))


def _transport(ssl_context: Any) -> httpx.HTTPTransport:
    """httpx's transport with :class:`_CoalescingStream` connections (same pool settings)."""
    transport = httpx.HTTPTransport(verify=ssl_context, http2=False, trust_env=False)
    limits = httpx.Limits(max_connections=100, max_keepalive_connections=20, keepalive_expiry=5.0)
    transport._pool = httpcore.ConnectionPool(  # httpx exposes no network_backend argument
        ssl_context=ssl_context, max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections,
        keepalive_expiry=limits.keepalive_expiry, http1=True, http2=False,
        network_backend=_CoalescingBackend(),
    )
    return transport


class CoordinatorClient(AbstractContextManager["CoordinatorClient"]):
    """Calls the coordinator's API as one enterprise.

    Args:
        base_url: ``https://HOST:PORT`` from ``federation.toml``.
        cert, key, ca: the enterprise's client certificate, key and the federation CA.
        timeout: seconds for connect/read/write of one call (long polls add their wait).
        retry_for: total seconds to keep retrying transient failures of one call (a call
            given ``until`` stops retrying at ``until`` if that comes first).
    """

    def __init__(
        self,
        *,
        base_url: str,
        cert: Path,
        key: Path,
        ca: Path,
        timeout: float = 10.0,
        retry_for: float = 120.0,
        backoff: float = 0.1,
        max_backoff: float = 2.0,
        on_retry: Callable[[str], None] | None = None,
    ):
        check_client_certificate(cert)
        self._ssl = client_ssl_context(cert=cert, key=key, ca=ca)
        self._base_url, self._ca = base_url, ca
        self._timeout = timeout
        self._retry_for = retry_for
        self._backoff = backoff
        self._max_backoff = max_backoff
        self._on_retry = on_retry
        self._http = httpx.Client(
            base_url=base_url, transport=_transport(self._ssl), timeout=timeout, trust_env=False
        )

    def close(self) -> None:
        self._http.close()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ plumbing

    def _call(self, method: str, url: str, *, wait: float | None = None,
              until: float | None = None, **kw: Any) -> httpx.Response:
        """One API call, retried on connection failures and 5xx with capped backoff.

        ``wait``: the long poll the call asks for (its ``wait`` parameter), shortened so the
        answer can arrive before ``until``. ``until``: a :func:`time.monotonic` instant the call
        ends by -- every attempt's timeouts are cut to the time left and retries stop there.

        Raises:
            CoordinatorUnreachable: no answer within ``retry_for`` / before ``until`` (names
                the last failure).
            TransportError: a refused TLS handshake (not retried).
        """
        give_up = time.monotonic() + self._retry_for
        if until is not None:
            give_up = min(give_up, until)
        delay = self._backoff
        reason = "no attempt"
        while True:
            left = (until - time.monotonic()) if until is not None else None
            if left is not None and left <= 0:
                raise CoordinatorUnreachable(
                    f"{method} {url} must succeed before the stage's deadline (last: {reason})")
            poll = 0.0
            if wait is not None:  # the server answers after at most ``poll`` s
                poll = wait if left is None else max(0.0, min(wait, left - ANSWER_S))
                kw["params"] = {**kw.get("params", {}), "wait": round(poll, 3)}
            per_op = self._timeout if left is None else min(self._timeout, left)
            read = per_op + poll if left is None else min(per_op + poll, left)
            timeout = httpx.Timeout(per_op, read=read)
            try:
                response = self._http.request(method, url, timeout=timeout, **kw)
            except httpx.TransportError as exc:
                reason = f"{type(exc).__name__}"
                if _is_tls_refusal(exc):
                    other = other_federation(self._base_url, self._ca)
                    raise TransportError(other or self._refusal(exc)) from None
            else:
                if response.status_code not in RETRY_STATUSES:
                    return response
                reason = f"HTTP {response.status_code}"
            if time.monotonic() + delay > give_up:
                if until is not None and give_up == until:
                    raise CoordinatorUnreachable(
                        f"{method} {url} must succeed before the stage's deadline "
                        f"(last: {reason})")
                raise CoordinatorUnreachable(
                    f"{method} {url} must succeed within {self._retry_for:.0f} s (last: {reason})"
                )
            if self._on_retry:
                self._on_retry(f"{method} {url}: {reason}; retrying in {delay:.2f} s")
            time.sleep(delay * (0.5 + secrets.randbelow(1000) / 1000))
            delay = min(delay * 2, self._max_backoff)

    def _refusal(self, exc: Exception) -> str:
        """One line for a refused handshake; an expired coordinator certificate is named with
        its expiry date (read without verification, for the message only)."""
        text = str(exc)
        if "certificate has expired" in text:
            when = _server_not_after(self._base_url)
            return (f"coordinator certificate must be valid now (expired on {when}); the admin "
                    "renews it with: secfed federation renew --kit-root DIR")
        return f"TLS handshake with the coordinator failed ({text})"

    @staticmethod
    def _raise_for(response: httpx.Response) -> None:
        if response.status_code < 400:
            return
        try:
            body = ErrorBody.model_validate_json(response.content)
        except Exception:  # not our error format (e.g. FastAPI's 422 validation list)
            raise TransportError(
                f"coordinator answered {response.status_code}: {response.text[:200]}"
            ) from None
        raise error_from_body(response.status_code, body)

    # ------------------------------------------------------------------ API

    def health(self) -> dict[str, str]:
        r = self._call("GET", "/v1/health")
        self._raise_for(r)
        return r.json()

    def round_info(self, *, after: int = 0, wait: float = 0.0,
                   until: float | None = None) -> RoundInfo:
        r = self._call("GET", "/v1/round", params={"after": after}, wait=wait, until=until)
        self._raise_for(r)
        return RoundInfo.model_validate_json(r.content)

    def inbox(self, *, round_number: int, stage: str, wait: float = 0.0,
              until: float | None = None) -> bytes | None:
        """This enterprise's input for ``stage``; None while the stage is not open yet."""
        r = self._call("GET", f"/v1/rounds/{round_number}/inbox/{stage}", wait=wait,
                       until=until)
        if r.status_code == 425:
            return None
        self._raise_for(r)
        return r.content

    def submit(self, envelope: Envelope, *, until: float | None = None) -> SubmitAck:
        r = self._call(
            "POST",
            f"/v1/rounds/{envelope.round_number}/stages/{envelope.stage}",
            content=envelope.to_bytes(),
            headers={"content-type": "application/octet-stream"},
            until=until,
        )
        self._raise_for(r)
        return SubmitAck.model_validate_json(r.content)

    def exchange(self, envelope: Envelope, *, next_stage: str, wait: float = 0.0,
                 until: float | None = None) -> bytes | None:
        """Submit ``envelope`` and wait for this enterprise's input for ``next_stage`` in one
        call; None when the message was accepted but that stage did not open within ``wait``
        (then poll :meth:`inbox`). Safe to retry: a re-sent identical message is a duplicate."""
        r = self._call(
            "POST",
            f"/v1/rounds/{envelope.round_number}/stages/{envelope.stage}/exchange",
            params={"next": next_stage},
            content=envelope.to_bytes(),
            headers={"content-type": "application/octet-stream"},
            wait=wait, until=until,
        )
        if r.status_code == 202:
            return None
        self._raise_for(r)
        return r.content

    def confirm(self, *, round_number: int, confirmation: AppliedConfirmation,
                until: float | None = None) -> SubmitAck:
        r = self._call(
            "POST", f"/v1/rounds/{round_number}/applied", json=confirmation.model_dump(),
            until=until,
        )
        self._raise_for(r)
        return SubmitAck.model_validate_json(r.content)

    def refuse(self, *, round_number: int, refusal: RoundRefusal,
               retry_for: float = REFUSAL_RETRY_S) -> SubmitAck:
        """Tell the coordinator this site declines the round (signed reason); best effort, so
        it retries only briefly (``retry_for``)."""
        r = self._call("POST", f"/v1/rounds/{round_number}/refusal", json=refusal.model_dump(),
                       until=time.monotonic() + retry_for)
        self._raise_for(r)
        return SubmitAck.model_validate_json(r.content)

    def ready(self) -> RoundInfo:
        """Report that this site can train now (round 1 waits for the roster's reports)."""
        r = self._call("POST", "/v1/ready", json=SiteReady().model_dump())
        self._raise_for(r)
        return RoundInfo.model_validate_json(r.content)

    def outcome(self, *, round_number: int, until: float | None = None) -> RoundOutcome:
        r = self._call("GET", f"/v1/rounds/{round_number}/outcome", until=until)
        self._raise_for(r)
        return RoundOutcome.model_validate_json(r.content)

    def aggregate(self, *, round_number: int) -> bytes:
        r = self._call("GET", f"/v1/rounds/{round_number}/aggregate")
        self._raise_for(r)
        return r.content

    def raw(self, method: str, url: str, **kw: Any) -> httpx.Response:
        """One call without retries (tests and probes)."""
        return self._http.request(method, url, **kw)


def check_client_certificate(cert: Path) -> None:
    """Refuse an expired (or not yet valid) client certificate before anything else happens.

    Raises:
        ConfigError: one line naming the expiry date and the renew command.
    """
    check_not_expired(cert, what="client certificate", renew=_renew_hint(cert))


def _renew_hint(cert: Path) -> str:
    """The renew command for this kit (kit root = the folder above the enterprise's kit)."""
    from cryptography import x509

    try:
        cn = x509.load_pem_x509_certificate(Path(cert).read_bytes()).subject \
            .get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
    except (OSError, ValueError, IndexError):
        cn = "ID"
    return renew_command(Path(cert).resolve().parent.parent, str(cn))


def _server_not_after(base_url: str) -> str:
    """The coordinator certificate's notAfter, fetched without verification (message only)."""
    import socket
    import ssl
    from urllib.parse import urlsplit

    from cryptography import x509

    url = urlsplit(base_url)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # nosec B501 # reads the date for an error message only
    try:
        with socket.create_connection((url.hostname or "127.0.0.1", url.port or 443),
                                      timeout=5) as raw, ctx.wrap_socket(raw) as tls:
            der = tls.getpeercert(binary_form=True)
        return f"{x509.load_der_x509_certificate(der or b'').not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
    except (OSError, ValueError):
        return "an unknown date"


def _is_tls_refusal(exc: Exception) -> bool:
    text = str(exc).lower()
    return any(s in text for s in ("certificate", "alert unknown ca", "alert bad", "alert expired"))


def other_federation(base_url: str, ca: Path, *, timeout: float = 5.0) -> str | None:
    """After a refused TLS handshake: if the server at ``base_url`` presents a certificate that
    the kit's federation CA did not issue, a one-line explanation naming both federations
    (the CA's common name is "<federation> federation CA"); otherwise None.

    The certificate is read over an unverified handshake and only compared, never trusted:
    nothing is sent on that connection.
    """
    import socket
    import ssl
    from urllib.parse import urlsplit

    from cryptography import x509
    from cryptography.exceptions import InvalidSignature as BadSignature
    from cryptography.x509.oid import NameOID

    url = urlsplit(base_url)
    host, port = url.hostname or "127.0.0.1", url.port or 443
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    probe.check_hostname = False
    probe.verify_mode = ssl.CERT_NONE
    try:
        ours = x509.load_pem_x509_certificate(ca.read_bytes())
        with socket.create_connection((host, port), timeout=timeout) as raw, \
                probe.wrap_socket(raw, server_hostname=host) as tls:
            der = tls.getpeercert(binary_form=True)
        theirs = x509.load_der_x509_certificate(der or b"")
    except (OSError, ValueError):
        return None
    try:
        theirs.verify_directly_issued_by(ours)
        return None  # our federation's coordinator: the refusal has another cause
    except (ValueError, TypeError, BadSignature):  # another issuer, key type or signature
        pass

    def cn(name: x509.Name) -> str:
        found = name.get_attributes_for_oid(NameOID.COMMON_NAME)
        return str(found[0].value) if found else name.rfc4514_string()

    mine, served = cn(ours.subject), cn(theirs.issuer)
    suffix = " federation CA"
    fed_mine = mine.removesuffix(suffix) if mine.endswith(suffix) else mine
    fed_served = served.removesuffix(suffix) if served.endswith(suffix) else served
    return (f"this kit belongs to federation {fed_mine!r}, but the coordinator at {host}:{port} "
            f"serves federation {fed_served!r} (its certificate is issued by {served!r}, not by "
            f"this kit's CA): use that federation's kit, or fix coordinator_url in the kit's "
            "federation.toml")
