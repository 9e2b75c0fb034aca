"""The enterprise side of the transport: an HTTP/1.1 client over mutual TLS, with retries.

It pins the federation CA (no system roots), presents the enterprise's client certificate, puts
a timeout on every call, and retries connection failures and 5xx answers with capped
exponential backoff and jitter until ``retry_for`` seconds have passed, so a coordinator restart
is ridden out. Uploads are idempotent on the server side (same bytes -> same acknowledgement), so
retrying a POST whose answer was lost is safe. Typed errors from the server are raised again as
the same :mod:`secfed.errors` class.

The HTTP layer is a small keep-alive connection pool over ``ssl`` sockets (thread-safe: the join
loop's key set-up thread and its main thread share one client). It speaks the subset of HTTP/1.1
the coordinator's API uses -- one request at a time per connection, ``Content-Length`` or chunked
bodies -- and writes each request's head and body in one TLS write. It replaced httpx on the
round's critical path: httpx spent ~0.6 ms of CPU per call here, a round's stages make several
calls per site, and on two shared cores every process's CPU is on everyone's critical path.
"""

from __future__ import annotations

import json
import secrets
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

from secfed.crypto.errors import TransportError
from secfed.transport.api import (
    AppliedConfirmation,
    Envelope,
    ErrorBody,
    RoundInfo,
    RoundOutcome,
    SubmitAck,
    error_from_body,
)
from secfed.transport.pki import client_ssl_context

__all__ = ["CoordinatorClient", "Response"]

RETRY_STATUSES = frozenset({500, 502, 503, 504})
MAX_HEADER_LINE = 64 * 1024
MAX_HEADERS = 100
MAX_RESPONSE_BYTES = 1 << 31  # sanity bound on a declared Content-Length
IDLE_CONNECTIONS = 4  # kept per client (two threads use it at most)


class Response:
    """A complete HTTP response (status, lower-cased headers, body)."""

    __slots__ = ("status_code", "headers", "content")

    def __init__(self, status_code: int, headers: dict[str, str], content: bytes):
        self.status_code = status_code
        self.headers = headers
        self.content = content

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.content)


class _BadResponse(Exception):
    """The server's bytes were not a complete HTTP/1.1 response (connection is dropped)."""


class _Connection:
    """One keep-alive HTTP/1.1 connection over TLS."""

    def __init__(self, host: str, port: int, ctx: ssl.SSLContext, timeout: float):
        raw = socket.create_connection((host, port), timeout=timeout)
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sock = ctx.wrap_socket(raw, server_hostname=host)
        except BaseException:
            raw.close()
            raise
        self.reader = self.sock.makefile("rb")
        self.host_header = f"{host}:{port}"
        self.reusable = True

    def close(self) -> None:
        self.reusable = False
        try:
            self.reader.close()
        finally:
            self.sock.close()

    def stale(self) -> bool:
        """True when the idle connection was closed by the server (readable = EOF or junk)."""
        try:
            return bool(select.select([self.sock], [], [], 0)[0])
        except (OSError, ValueError):
            return True

    def request(self, method: str, target: str, body: bytes, headers: Mapping[str, str],
                timeout: float) -> Response:
        self.sock.settimeout(timeout)
        lines = [f"{method} {target} HTTP/1.1", f"Host: {self.host_header}"]
        if body or method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {len(body)}")
        lines += [f"{k}: {v}" for k, v in headers.items()]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        try:
            if len(body) <= 64 * 1024:
                self.sock.sendall(head + body)  # one TLS write: one wake-up of the server
            else:
                self.sock.sendall(head)
                self.sock.sendall(body)
        except OSError:
            # The server may have answered (413) and closed while the body was still going:
            # read that answer if it is there, else report the failure to send.
            try:
                return self._read_response(method)
            except (OSError, _BadResponse):
                pass
            raise
        return self._read_response(method)

    def _readline(self) -> bytes:
        line = self.reader.readline(MAX_HEADER_LINE + 1)
        if len(line) > MAX_HEADER_LINE:
            raise _BadResponse("response header line too long")
        return line

    def _read_response(self, method: str) -> Response:
        status_line = self._readline()
        if not status_line:
            raise _BadResponse("server closed the connection before answering")
        parts = status_line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise _BadResponse(f"malformed status line {status_line[:60]!r}")
        status = int(parts[1])
        headers: dict[str, str] = {}
        while True:
            line = self._readline()
            if line in (b"\r\n", b"\n"):
                break
            if not line:
                raise _BadResponse("server closed the connection inside the headers")
            if len(headers) >= MAX_HEADERS:
                raise _BadResponse("too many response headers")
            name, sep, value = line.decode("latin-1").partition(":")
            if not sep:
                raise _BadResponse(f"malformed header line {line[:60]!r}")
            headers[name.strip().lower()] = value.strip()
        if headers.get("connection", "").lower() == "close" or parts[0] == b"HTTP/1.0":
            self.reusable = False
        if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            return Response(status, headers, b"")
        if "chunked" in headers.get("transfer-encoding", "").lower():
            return Response(status, headers, self._read_chunked())
        if "content-length" in headers:
            try:
                length = int(headers["content-length"])
            except ValueError:
                raise _BadResponse("malformed Content-Length") from None
            if not 0 <= length <= MAX_RESPONSE_BYTES:
                raise _BadResponse(f"Content-Length out of range ({length})")
            content = self.reader.read(length)
            if len(content) != length:
                raise _BadResponse("server closed the connection inside the body")
            return Response(status, headers, content)
        self.reusable = False  # body delimited by the end of the connection
        return Response(status, headers, self.reader.read())

    def _read_chunked(self) -> bytes:
        chunks: list[bytes] = []
        while True:
            size_line = self._readline().split(b";", 1)[0].strip()
            try:
                size = int(size_line, 16)
            except ValueError:
                raise _BadResponse("malformed chunk size") from None
            if size == 0:
                while self._readline() not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(chunks)
            chunk = self.reader.read(size)
            if len(chunk) != size or self.reader.read(2) != b"\r\n":
                raise _BadResponse("server closed the connection inside a chunk")
            chunks.append(chunk)


class _Pool:
    """Keep-alive connections to one server, shared by threads."""

    def __init__(self, base_url: str, ctx: ssl.SSLContext):
        url = urlsplit(base_url)
        if url.scheme != "https" or not url.hostname:
            raise TransportError(f"coordinator_url must be https://HOST:PORT (got {base_url!r})")
        self.host, self.port = url.hostname, url.port or 443
        self._ctx = ctx
        self._idle: list[_Connection] = []
        self._lock = threading.Lock()
        self._closed = False

    def request(self, method: str, target: str, body: bytes, headers: Mapping[str, str],
                *, timeout: float, connect_timeout: float) -> Response:
        conn = self._take(connect_timeout)
        try:
            response = conn.request(method, target, body, headers, timeout)
        except BaseException:
            conn.close()
            raise
        self._give_back(conn)
        return response

    def _take(self, connect_timeout: float) -> _Connection:
        while True:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                return _Connection(self.host, self.port, self._ctx, connect_timeout)
            if not conn.stale():
                return conn
            conn.close()

    def _give_back(self, conn: _Connection) -> None:
        if conn.reusable:
            with self._lock:
                if not self._closed and len(self._idle) < IDLE_CONNECTIONS:
                    self._idle.append(conn)
                    return
        conn.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle, self._closed = self._idle, [], True
        for conn in idle:
            conn.close()


class CoordinatorClient:
    """Calls the coordinator's API as one enterprise.

    Args:
        base_url: ``https://HOST:PORT`` from ``federation.toml``.
        cert, key, ca: the enterprise's client certificate, key and the federation CA.
        timeout: seconds for connect/read/write of one call (long polls add their wait).
        retry_for: total seconds to keep retrying transient failures of one call.
    """

    def __init__(
        self,
        *,
        base_url: str,
        cert: Path,
        key: Path,
        ca: Path,
        timeout: float = 30.0,
        retry_for: float = 120.0,
        backoff: float = 0.1,
        max_backoff: float = 2.0,
        on_retry: Callable[[str], None] | None = None,
    ):
        self._ssl = client_ssl_context(cert=cert, key=key, ca=ca)
        self._timeout = timeout
        self._retry_for = retry_for
        self._backoff = backoff
        self._max_backoff = max_backoff
        self._on_retry = on_retry
        self._pool = _Pool(base_url, self._ssl)

    def close(self) -> None:
        self._pool.close()

    def __enter__(self) -> CoordinatorClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ plumbing

    def _request(self, method: str, url: str, *, params: Mapping[str, Any] | None = None,
                 content: bytes = b"", json_body: Any = None, headers: Mapping[str, str] | None = None,
                 timeout: float | None = None) -> Response:
        """One request, no retries."""
        target = f"{url}?{urlencode(params)}" if params else url
        hdrs = dict(headers or {})
        if json_body is not None:
            content = json.dumps(json_body, separators=(",", ":")).encode()
            hdrs.setdefault("content-type", "application/json")
        return self._pool.request(method, target, content, hdrs,
                                  timeout=timeout if timeout is not None else self._timeout,
                                  connect_timeout=self._timeout)

    def _call(self, method: str, url: str, *, extra_timeout: float = 0.0, **kw: Any) -> Response:
        deadline = time.monotonic() + self._retry_for
        delay = self._backoff
        while True:
            try:
                response = self._request(method, url, timeout=self._timeout + extra_timeout, **kw)
            except (OSError, _BadResponse) as exc:
                reason = f"{type(exc).__name__}"
                if _is_tls_refusal(exc):
                    raise TransportError(f"TLS handshake with the coordinator failed ({exc})") from None
            else:
                if response.status_code not in RETRY_STATUSES:
                    return response
                reason = f"HTTP {response.status_code}"
            if time.monotonic() + delay > deadline:
                raise TransportError(
                    f"{method} {url} must succeed within {self._retry_for:.0f} s (last: {reason})"
                )
            if self._on_retry:
                self._on_retry(f"{method} {url}: {reason}; retrying in {delay:.2f} s")
            time.sleep(delay * (0.5 + secrets.randbelow(1000) / 1000))
            delay = min(delay * 2, self._max_backoff)

    @staticmethod
    def _raise_for(response: Response) -> None:
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

    def round_info(self, *, after: int = 0, wait: float = 0.0) -> RoundInfo:
        r = self._call("GET", "/v1/round", params={"after": after, "wait": wait}, extra_timeout=wait)
        self._raise_for(r)
        return RoundInfo.model_validate_json(r.content)

    def inbox(self, *, round_number: int, stage: str, wait: float = 0.0) -> bytes | None:
        """This enterprise's input for ``stage``; None while the stage is not open yet."""
        r = self._call(
            "GET", f"/v1/rounds/{round_number}/inbox/{stage}", params={"wait": wait},
            extra_timeout=wait,
        )
        if r.status_code == 425:
            return None
        self._raise_for(r)
        return r.content

    def submit(self, envelope: Envelope) -> SubmitAck:
        r = self._call(
            "POST",
            f"/v1/rounds/{envelope.round_number}/stages/{envelope.stage}",
            content=envelope.to_bytes(),
            headers={"content-type": "application/octet-stream"},
        )
        self._raise_for(r)
        return SubmitAck.model_validate_json(r.content)

    def exchange(self, envelope: Envelope, *, next_stage: str, wait: float = 0.0) -> bytes | None:
        """Submit ``envelope`` and wait for this enterprise's input for ``next_stage`` in one
        call; None when the message was accepted but that stage did not open within ``wait``
        (then poll :meth:`inbox`). Safe to retry: a re-sent identical message is a duplicate."""
        r = self._call(
            "POST",
            f"/v1/rounds/{envelope.round_number}/stages/{envelope.stage}/exchange",
            params={"next": next_stage, "wait": wait},
            content=envelope.to_bytes(),
            headers={"content-type": "application/octet-stream"},
            extra_timeout=wait,
        )
        if r.status_code == 202:
            return None
        self._raise_for(r)
        return r.content

    def confirm(self, *, round_number: int, confirmation: AppliedConfirmation) -> SubmitAck:
        r = self._call(
            "POST", f"/v1/rounds/{round_number}/applied", json_body=confirmation.model_dump()
        )
        self._raise_for(r)
        return SubmitAck.model_validate_json(r.content)

    def outcome(self, *, round_number: int) -> RoundOutcome:
        r = self._call("GET", f"/v1/rounds/{round_number}/outcome")
        self._raise_for(r)
        return RoundOutcome.model_validate_json(r.content)

    def aggregate(self, *, round_number: int) -> bytes:
        r = self._call("GET", f"/v1/rounds/{round_number}/aggregate")
        self._raise_for(r)
        return r.content

    def raw(self, method: str, url: str, **kw: Any) -> Response:
        """One call without retries (tests and probes): ``params``, ``content``, ``json_body``,
        ``headers``."""
        return self._request(method, url, **kw)


def _is_tls_refusal(exc: Exception) -> bool:
    text = str(exc).lower()
    return any(s in text for s in ("certificate", "alert unknown ca", "alert bad", "alert expired"))

