"""The coordinator's read-only operator listener: the status page, ``/status.json`` and
``/metrics`` over plain HTTP (``secfed aggregate --status-listen HOST:PORT``).

It serves GET and HEAD only, and nothing it serves comes from a request: the three views are
callables the coordinator hands over, built from numbers and states (never keys, shares or
update values). Plain HTTP is why it binds a loopback address unless the operator asks for
another one explicitly (:func:`check_listen`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from secfed.errors import ConfigError, TransportError

__all__ = ["StatusViews", "create_status_app", "parse_listen", "check_listen", "bind",
           "serve_status", "DEFAULT_STATUS_LISTEN"]

DEFAULT_STATUS_LISTEN = "127.0.0.1:0"  # loopback; port 0: a free one, announced at start
_HEADERS = [(b"cache-control", b"no-store"), (b"x-content-type-options", b"nosniff"),
            (b"referrer-policy", b"no-referrer"), (b"x-frame-options", b"DENY")]


class StatusViews:
    """What the listener serves: ``page()`` (HTML, with its CSP), ``snapshot()`` (a dict) and
    ``metrics()`` (Prometheus text, with its content type)."""

    def __init__(self, *, page: Callable[[], str], csp: str, snapshot: Callable[[], dict],
                 metrics: Callable[[], bytes], metrics_type: str):
        self.page, self.csp, self.snapshot = page, csp, snapshot
        self.metrics, self.metrics_type = metrics, metrics_type


def create_status_app(views: StatusViews) -> Callable[[dict, Callable, Callable],
                                                      Awaitable[None]]:
    """A minimal ASGI app: ``/`` (HTML), ``/status.json``, ``/metrics``; 404/405 otherwise."""

    async def app(scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        extra: list[tuple[bytes, bytes]] = []
        if method not in ("GET", "HEAD"):
            status, ctype, body = 405, "text/plain", b"read-only: GET or HEAD\n"
            extra.append((b"allow", b"GET, HEAD"))
        elif path in ("/", "/index.html"):
            status, ctype, body = 200, "text/html; charset=utf-8", views.page().encode()
            extra.append((b"content-security-policy", views.csp.encode()))
        elif path == "/status.json":
            status, ctype = 200, "application/json"
            body = json.dumps(views.snapshot(), sort_keys=True).encode()
        elif path == "/metrics":
            status, ctype, body = 200, views.metrics_type, views.metrics()
        else:
            status, ctype, body = 404, "text/plain", b"not found\n"
        headers = [(b"content-type", ctype.encode()), (b"content-length", str(len(body)).encode()),
                   *_HEADERS, *extra]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if method == "HEAD" else body})

    return app


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) as (host, port).

    Raises:
        ConfigError: naming the option and the value received.
    """
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"--status-listen must be HOST:PORT with a port 0-65535 (got {text!r})")
    return host, int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_listen(host: str, *, allow_remote: bool) -> str | None:
    """None for a loopback address; a warning for another one if ``allow_remote``.

    Raises:
        ConfigError: a non-loopback address without ``allow_remote``.
    """
    if is_loopback(host):
        return None
    if not allow_remote:
        raise ConfigError(
            f"--status-listen must be a loopback address unless --status-public is given "
            f"(got {host!r}): the status page and /metrics are plain, unauthenticated HTTP")
    return (f"the status page and /metrics on {host} are plain, unauthenticated HTTP: anyone "
            "who can reach that address sees the federation's round, stage and site states")


def bind(host: str, port: int, *, what: str) -> socket.socket:
    """A listening TCP socket, bound before any server starts (so a busy port is one line).

    Raises:
        TransportError: the address is in use or cannot be bound, naming ``what`` and the port.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise TransportError(f"{what} host must resolve (got {host!r}: {exc.strerror})") from None
    family, _type, _proto, _name, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        if exc.errno in (98, 48, 10048):  # EADDRINUSE on Linux, macOS, Windows
            raise TransportError(
                f"{what} port {port} on {host} is already in use (another secfed aggregate or "
                "another program): stop it or choose another port") from None
        raise TransportError(f"{what} must bind {host}:{port} ({exc.strerror})") from None
    sock.setblocking(False)
    return sock


class _NoSignals:
    """Mixin: leave signal handling to the caller (one handler for both listeners)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Any:
        yield


async def serve_status(app: Any, *, sock: socket.socket, stop: asyncio.Event,
                       log_level: str = "warning") -> None:
    """Serve ``app`` over plain HTTP on the bound ``sock`` until ``stop`` is set."""
    import uvicorn

    class _Server(_NoSignals, uvicorn.Server):
        pass

    from uvicorn.protocols.http.h11_impl import H11Protocol

    from secfed.transport.server import _CoalescingTransport

    class _Protocol(H11Protocol):
        """A response's head and body leave in one write: two small writes wait on the
        client's delayed ACK (~40 ms a scrape on loopback)."""

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(_CoalescingTransport(transport))  # type: ignore[arg-type]

    config = uvicorn.Config(app, log_level=log_level, lifespan="off", access_log=False,
                            timeout_graceful_shutdown=1, timeout_keep_alive=5, http=_Protocol)
    server = _Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    server.should_exit = True
    stopper.cancel()
    await task
