"""A site's participant process for Flower's deployment engine (``secfed flower site``).

A SuperNode runs every ClientApp message in a fresh process, and Flower hands that process the
node's ``Context`` -- so a round's ephemeral secrets kept in the ClientApp would have to travel
through Flower's node state. secfed keeps them where they live over HTTPS instead: in the
site's own long-running participant process, with its kit, ledger and state. That process
(:func:`serve`) listens on a Unix socket in the kit directory (mode 0600, owner only); the
ClientApp started by the SuperNode is a relay that forwards each message's fields there and
returns the answer (:func:`relay`).

Frame (both ways): ``u32 header length | header JSON | bytes fields``; the header lists the
bytes fields' names and lengths, in order. No pickle.
"""

from __future__ import annotations

import json
import os
import socket
import socketserver
import struct
import threading
from pathlib import Path
from typing import Any

from secfed.errors import MessageFormatError, SecfedError, TransportError

__all__ = ["SOCKET_NAME", "serve", "relay", "encode_frame", "read_frame"]

SOCKET_NAME = "flower-agent.sock"
MAX_HEADER = 1 << 20
MAX_FRAME = 1 << 31
_LEN = struct.Struct(">I")


def encode_frame(fields: dict[str, Any]) -> bytes:
    blobs = {k: bytes(v) for k, v in fields.items() if isinstance(v, bytes | bytearray | memoryview)}
    header = {k: v for k, v in fields.items() if k not in blobs}
    header["_bytes"] = [[k, len(v)] for k, v in blobs.items()]
    head = json.dumps(header).encode()
    return _LEN.pack(len(head)) + head + b"".join(blobs.values())


def _read_exact(sock: Any, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise TransportError("site agent connection closed mid-frame")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read_frame(sock: Any) -> dict[str, Any]:
    """Raises: MessageFormatError (a malformed frame), TransportError (closed mid-frame)."""
    (size,) = _LEN.unpack(_read_exact(sock, _LEN.size))
    if size > MAX_HEADER:
        raise MessageFormatError(f"agent frame header must be <= {MAX_HEADER} bytes (got {size})")
    try:
        header = json.loads(_read_exact(sock, size))
        blobs = [(str(k), int(n)) for k, n in header.pop("_bytes")]
    except (ValueError, KeyError, TypeError) as exc:
        raise MessageFormatError(f"agent frame header must be JSON with _bytes ({exc})") from None
    if any(n < 0 for _, n in blobs) or sum(n for _, n in blobs) > MAX_FRAME:
        raise MessageFormatError("agent frame bytes fields must be 0..2 GiB")
    for name, n in blobs:
        header[name] = _read_exact(sock, n)
    return dict(header)


def socket_path(kit_dir: str | Path) -> Path:
    return Path(kit_dir) / SOCKET_NAME


def relay(kit_dir: str | Path, step: str, fields: dict[str, Any], node_id: int,
          timeout: float) -> tuple[str, bytes]:
    """Forward one message to the site's agent; its (kind, payload).

    Raises:
        TransportError: no agent listens for this kit (start ``secfed flower site``).
    """
    path = socket_path(kit_dir)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except OSError as exc:
            raise TransportError(
                f"site agent must listen on {path} (start: secfed flower site --kit "
                f"{kit_dir}): {exc.strerror}") from None
        sock.sendall(encode_frame({**fields, "_step": step, "_node": node_id}))
        got = read_frame(sock)
    return str(got.get("kind", "error")), bytes(got.get("payload", b""))


def serve(kit_dir: str | Path, *, new_ledger: bool = False, site_factory: Any = None,
          stop: threading.Event | None = None) -> None:
    """Serve the site's participant on its kit's socket until the federation is finished (or
    ``stop`` is set).

    Raises:
        ConfigError: another process already serves this kit.
    """
    from secfed.flower.client import SiteSession, answer, synthetic_site

    session = SiteSession(Path(kit_dir), site_factory=site_factory or synthetic_site,
                          new_ledger=new_ledger)
    path = socket_path(kit_dir)
    path.unlink(missing_ok=True)  # a stale socket: the kit lock proves no agent serves it

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            try:
                fields = read_frame(self.request)
                step, node = str(fields.pop("_step")), int(fields.pop("_node"))
                result = answer(session, step, fields, node)
                out = {"kind": result.kind, "payload": result.payload}
            except (SecfedError, KeyError, ValueError) as exc:
                out = {"kind": "error", "payload": f"{type(exc).__name__}: {exc}".encode()}
            self.request.sendall(encode_frame(out))

    class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
        daemon_threads = True

    old = os.umask(0o177)  # the socket is created 0600: only this user can reach the site
    try:
        server = Server(str(path), Handler)
    finally:
        os.umask(old)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                              daemon=True)
    thread.start()
    try:
        while not session.finished.wait(0.5):
            if stop is not None and stop.is_set():
                break
    finally:
        server.shutdown()
        server.server_close()
        path.unlink(missing_ok=True)
        session.close()
