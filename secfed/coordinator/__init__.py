"""The coordinator: drives rounds with the protocol state machines, transport and SQLite state.

Front door: :func:`run_coordinator` (what ``secfed aggregate`` calls).
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from secfed.errors import ConfigError
from secfed.federation.kits import CoordinatorKit
from secfed.names import CKKS_SLOTS
from secfed.transport.status_http import DEFAULT_STATUS_LISTEN

if TYPE_CHECKING:
    from secfed.coordinator.service import Coordinator

__all__ = ["Coordinator", "run_coordinator", "max_body_bytes"]

EventSink = Callable[[dict[str, Any]], None]


def __getattr__(name: str) -> Any:
    # The service imports torch (through the privacy accountant): loaded on first use, so a
    # locked kit or a busy port is reported before seconds of imports.
    if name == "Coordinator":
        from secfed.coordinator.service import Coordinator

        return Coordinator
    raise AttributeError(name)

CKKS_CIPHERTEXT_BYTES = 300_000  # one N=8192, [60, 60] ciphertext serialises to ~262 KB
LINGER_S = 3.0  # after the last site was told the federation finished: its last fetches
LINGER_MAX_S = 30.0  # the longest wait for a site that was heard from but not told yet
GRACEFUL_S = 1  # on stop, open requests (long polls up to 60 s) get this long to finish
LOCK_FILE = "coordinator.lock"  # next to state.sqlite in the coordinator kit


def max_body_bytes(vector_length: int) -> int:
    """Largest upload the server accepts: the bigger of the masked and the CKKS upload + slack."""
    masked = 8 * vector_length
    ckks = -(-vector_length // CKKS_SLOTS) * CKKS_CIPHERTEXT_BYTES
    return int(max(masked, ckks) * 1.25) + (1 << 20)


def _lock(path: Path) -> Any:
    """Hold an exclusive lock on ``path`` for this process's life (a second coordinator on the
    same kit would interleave two writers' rounds in one state file).

    Raises:
        ConfigError: another process holds it (names the lock file and, if known, its pid).
    """
    import fcntl

    handle = open(path, "a+")  # noqa: SIM115 -- held open until the process exits
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise ConfigError(
            f"the coordinator kit must be used by one secfed aggregate at a time: the lock "
            f"{path} is held (pid {holder})") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def _bind_ports(kit: CoordinatorKit, status_listen: str | None, status_public: bool,
                emit: EventSink) -> tuple[str, int, Any, Any]:
    """Bind the API port (``coordinator_url``) and, with ``status_listen``, the status page's,
    before anything starts; a non-loopback status host without ``status_public`` is refused and
    one with it is announced as a ``warning`` event. Returns (API host, API port, API socket,
    status socket or None)."""
    from secfed.transport.status_http import bind, check_listen, parse_listen

    status_addr = None
    if status_listen:
        status_addr = parse_listen(status_listen)
        warning = check_listen(status_addr[0], allow_remote=status_public)
        if warning:
            emit({"event": "warning", "warning": warning})
    url = urlsplit(kit.federation.coordinator_url)
    host, port = url.hostname or "127.0.0.1", url.port or 443
    api_sock = bind(host, port, what="coordinator (coordinator_url)")
    status_sock = bind(*status_addr, what="--status-listen") if status_addr else None
    return host, port, api_sock, status_sock


def run_coordinator(kit_dir: str | Path, *, events: EventSink | None = None,
                    log_level: str = "warning", durable: bool = False,
                    status_listen: str | None = DEFAULT_STATUS_LISTEN,
                    status_public: bool = False, wait_for_ready: bool = True,
                    keep_serving: bool = False) -> str | None:
    """Serve the coordinator's HTTPS API and drive every round of the federation in the kit.

    With ``status_listen`` (``HOST:PORT``; port 0 picks a free one) the read-only status page
    and ``/metrics`` are served there over plain HTTP; a non-loopback host needs
    ``status_public`` and is announced with a ``warning`` event. With ``wait_for_ready`` round
    1 opens once every roster site reported ready or ``deadlines.start`` passed. Both ports are bound before
    anything starts, and the kit is locked first, so a busy port or a second coordinator on
    the same kit is one error.

    Returns when the federation's last round is done: None; or on SIGTERM / SIGINT (after the
    servers stopped, state committed): the signal's name. With ``keep_serving`` it does not
    return after the last round: the API (outcomes, aggregates) and the status page stay up
    for a look until a signal stops them (event ``serving_until_stopped``).

    Raises:
        ConfigError: the kit is locked by another coordinator, or a bad ``status_listen``.
        TransportError: a port is in use or cannot be bound.
    """
    from secfed.federation.lifecycle import CRL_FILE, AllowList, renew_command
    from secfed.federation.pki import check_not_expired
    from secfed.transport.server import create_app, serve

    kit = CoordinatorKit.load(kit_dir)
    check_not_expired(kit.cert, what="coordinator certificate",
                      renew=renew_command(kit.root.resolve().parent))
    emit = events or (lambda _e: None)
    lock = _lock(kit.state.with_name(LOCK_FILE))
    host, port, api_sock, status_sock = _bind_ports(kit, status_listen, status_public, emit)
    from secfed.coordinator.memtrace import MemTrace, heap_trimmer
    from secfed.coordinator.service import Coordinator

    trace = MemTrace.from_env()  # SECFED_TRACEMALLOC=DIR: allocation dumps (off by default)
    coordinator = Coordinator(kit, events=_with_trim(events, heap_trimmer()), durable=durable,
                              wait_for_ready=wait_for_ready)
    stopped: list[str] = []

    async def main() -> None:
        done, stop = asyncio.Event(), asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda s=sig: (stopped.append(s.name), stop.set()))
        if trace is not None:
            loop.add_signal_handler(signal.SIGUSR1, trace.dump)

        async def drive() -> None:
            try:
                await coordinator.run()
            finally:
                done.set()

        app = create_app(
            coordinator,
            allowed=AllowList(kit.federation.enterprise_ids(), kit.root),
            max_body=max_body_bytes(kit.federation.model.vector_length),
            background=drive,
        )

        async def release() -> None:
            await stop.wait()
            await coordinator.stop()  # long polls answer now, before the server closes

        lingering = asyncio.create_task(_linger(coordinator, done, stop, keep_serving=keep_serving,
                                                limit=min(LINGER_MAX_S, kit.federation.deadlines.stage)))
        releasing = asyncio.create_task(release())
        status_task = _start_status(coordinator, status_sock, stop, log_level, emit)
        try:
            await serve(app, host=host, port=port, cert=kit.cert, key=kit.key, ca=kit.ca,
                        stop=stop, log_level=log_level, sock=api_sock, graceful_s=GRACEFUL_S,
                        crl=kit.root / CRL_FILE,
                        on_tls_reload=lambda msg: coordinator.emit("tls_reloaded", detail=msg))
        finally:
            stop.set()
            lingering.cancel()
            await releasing
            if status_task is not None:
                await status_task
            coordinator.state.close()

    try:
        asyncio.run(main())
    finally:
        lock.close()
        if trace is not None:
            trace.dump()
    if stopped:
        emit({"event": "coordinator_stopped", "signal": stopped[0],
              "state": str(kit.state)})
        return stopped[0]
    return None


def _with_trim(events: EventSink | None, trim: EventSink | None) -> EventSink | None:
    """``events``, then the heap trim after each round (:func:`memtrace.heap_trimmer`)."""
    if trim is None:
        return events

    def both(event: dict[str, Any]) -> None:
        if events is not None:
            events(event)
        trim(event)

    return both


async def _linger(coordinator: Any, done: asyncio.Event, stop: asyncio.Event, *,
                  keep_serving: bool, limit: float) -> None:
    """Once the federation is ``done``: wait (at most ``limit`` s) until every site was told,
    let them fetch the last outcome, then ``stop`` -- unless ``keep_serving`` (the operator
    asked for a look: the servers stay up until SIGTERM / SIGINT)."""
    await done.wait()
    await until_told(coordinator, limit)
    await asyncio.sleep(LINGER_S)
    if keep_serving:
        coordinator.emit("serving_until_stopped", rounds=coordinator.fed.rounds)
        return
    stop.set()


async def until_told(coordinator: Any, limit: float, *, period: float = 0.1) -> bool:
    """Wait (at most ``limit`` s) until every site the coordinator heard from was told the
    federation finished: a site that was stalled or cut off during the last round learns it
    on its next poll and stops, instead of retrying against a coordinator that left.
    Returns whether all were told."""
    loop = asyncio.get_running_loop()
    end = loop.time() + limit
    while not coordinator.told_everyone():
        if loop.time() >= end:
            return False
        await asyncio.sleep(period)
    return True


def _start_status(coordinator: Any, sock: Any, stop: asyncio.Event, log_level: str,
                  emit: EventSink) -> asyncio.Task | None:
    """Serve the status page and /metrics on ``sock`` (None: not asked for) until ``stop``."""
    if sock is None:
        return None
    from secfed.coordinator.metrics import CONTENT_TYPE, Metrics
    from secfed.coordinator.status_page import PAGE_CSP, render_page
    from secfed.transport.status_http import StatusViews, create_status_app, serve_status

    board = coordinator.board
    views = StatusViews(page=lambda: render_page(board), csp=PAGE_CSP, snapshot=board.snapshot,
                        metrics=Metrics(board).render, metrics_type=CONTENT_TYPE)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    emit({"event": "status_listening", "url": f"http://{shown}:{port}/",
          "metrics": f"http://{shown}:{port}/metrics"})
    return asyncio.create_task(serve_status(create_status_app(views), sock=sock, stop=stop,
                                            log_level=log_level))
