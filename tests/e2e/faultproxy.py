"""A loopback TCP proxy that misbehaves on demand, between ``join`` processes and the coordinator.

It forwards bytes untouched (TLS goes end to end through it) and can add latency and jitter,
refuse new connections (dropped), reset live ones (RST), stall every live connection (a peer
that stops reading and writing without closing) and partition (refuse + stall) until healed.
Test-only code: ``random`` is fine here, nothing secret depends on it.
"""

from __future__ import annotations

import random
import socket
import struct
import threading
import time
from dataclasses import dataclass


@dataclass
class Faults:
    latency_s: float = 0.0
    jitter_s: float = 0.0
    refuse: bool = False  # new connections are accepted and reset at once
    stall: bool = False  # live connections move no byte (and new ones neither)


def _rst(sock: socket.socket) -> None:
    """Close with an RST (linger 0), as a crashed middlebox would."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        # wake a pump thread blocked in recv on it: a close alone leaves that recv blocked and
        # the kernel keeps the connection (no RST) until it returns
        sock.shutdown(socket.SHUT_RD)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


class FaultProxy:
    """Listens on ``listen_port`` (127.0.0.1) and forwards to ``target_port``."""

    def __init__(self, listen_port: int, target_port: int):
        self.faults = Faults()
        self._target = ("127.0.0.1", target_port)
        self._server = socket.create_server(("127.0.0.1", listen_port), reuse_port=False)
        self._server.settimeout(0.2)
        self._lock = threading.Lock()
        self._live: set[socket.socket] = set()
        self._closed = threading.Event()
        self.accepted = 0
        self.refused = 0
        self.reset = 0
        threading.Thread(target=self._accept_loop, daemon=True).start()

    # ------------------------------------------------------------------ faults

    def reset_all(self) -> int:
        with self._lock:
            victims = list(self._live)
            self._live.clear()
        for sock in victims:
            _rst(sock)
        self.reset += len(victims)
        return len(victims)

    def partition(self, seconds: float) -> None:
        """Refuse and stall everything for ``seconds``, then heal."""
        self.faults.refuse = self.faults.stall = True
        time.sleep(seconds)
        self.faults.refuse = self.faults.stall = False

    def close(self) -> None:
        self._closed.set()
        self._server.close()
        self.reset_all()

    # ------------------------------------------------------------------ plumbing

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._server.accept()
            except (TimeoutError, OSError):
                continue
            if self.faults.refuse:
                self.refused += 1
                _rst(client)
                continue
            try:
                upstream = socket.create_connection(self._target, timeout=5)
            except OSError:
                _rst(client)
                continue
            upstream.settimeout(None)
            self.accepted += 1
            with self._lock:
                self._live.update((client, upstream))
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                while self.faults.stall and not self._closed.is_set():
                    time.sleep(0.05)
                delay = self.faults.latency_s + random.uniform(0, self.faults.jitter_s)
                if delay:
                    time.sleep(delay)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._live.discard(src)
                self._live.discard(dst)
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                try:
                    sock.close()
                except OSError:
                    pass
