"""The coordinator's HTTPS server: FastAPI on uvicorn with mutual TLS.

uvicorn does not put the peer certificate into the ASGI scope, so :class:`PeerCertH11Protocol`
reads it from the TLS transport when the connection is made (the handshake has completed and
the chain was verified against the federation CA by ``ssl.CERT_REQUIRED``) and wraps the app for
that connection so every request's scope carries ``extensions["secfed.peer"]``: the enterprise id
(CN = only DNS SAN), or the reason there is none. Routes then check the id against the allow-list.

Request bodies are bounded by :class:`BodyLimit` (413 before the app sees an oversized body).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Container
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse, Response
from uvicorn.protocols.http.h11_impl import H11Protocol

from secfed.errors import SecfedError, TransportError
from secfed.transport.api import (
    STAGES,
    AppliedConfirmation,
    Envelope,
    ErrorBody,
    FederationService,
    RoundInfo,
    RoundOutcome,
    RoundRefusal,
    SiteReady,
    SubmitAck,
    status_for,
)
from secfed.transport.tls import ReloadingServerContext, peer_identity

__all__ = ["create_app", "serve", "PeerCertH11Protocol", "BodyLimit", "PEER_KEY"]

PEER_KEY = "secfed.peer"
MAX_WAIT_S = 60.0  # longest long-poll a client may ask for
# a round number in a path: what the coordinator's SQLite state can hold (64-bit signed), so
# an absurd one is a 422 at the door rather than an overflow (a 500) deep in the service
RoundNumber = Annotated[int, PathParam(ge=0, le=2**62)]
OCTET = "application/octet-stream"
COALESCE_BYTES = 64 * 1024  # writes up to this size are joined with the others of a loop step

ASGIApp = Callable[[dict, Callable, Callable], Awaitable[None]]


class _WithPeer:
    """Per-connection wrapper adding the verified peer identity to each request scope."""

    def __init__(self, app: ASGIApp, peer: dict[str, str]):
        self._app = app
        self._peer = peer

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        scope.setdefault("extensions", {})[PEER_KEY] = self._peer
        await self._app(scope, receive, send)


class _CoalescingTransport:
    """Hands the writes of one event-loop step to the TLS transport as one write.

    uvicorn writes a response's head and its body separately; over TLS on loopback each write is
    its own record and ``send``, and each send wakes the peer (about 0.2 ms apiece on this
    machine's VM). Writes issued in the same loop step are joined and written at the end of it,
    so a response leaves as one record (a bulk body over :data:`COALESCE_BYTES` is written
    on its own after its head). Everything else goes to the wrapped transport; a
    :meth:`close` writes what is pending first.
    """

    def __init__(self, transport: asyncio.Transport):
        self._transport = transport
        self._pending: list[bytes] = []
        self._loop = asyncio.get_running_loop()

    def write(self, data: bytes) -> None:
        if len(data) > COALESCE_BYTES:  # a bulk body: its own write after the head
            self._flush()
            self._transport.write(data)
            return
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append(data)

    def _flush(self) -> None:
        if self._pending:
            data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
            self._pending.clear()
            if not self._transport.is_closing():
                self._transport.write(data)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def abort(self) -> None:
        self._pending.clear()
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class PeerCertH11Protocol(H11Protocol):
    """uvicorn's h11 protocol plus the verified client identity in the scope; a response's head
    and body leave in one TLS write (:class:`_CoalescingTransport`)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_CoalescingTransport(transport))  # type: ignore[arg-type]
        ssl_object = transport.get_extra_info("ssl_object")
        try:
            identity = peer_identity(ssl_object.getpeercert() if ssl_object else None)
            peer = {"id": identity}
        except TransportError as exc:
            peer = {"error": str(exc)}
        self.app = _WithPeer(self.app, peer)  # type: ignore[assignment]


class BodyLimit:
    """ASGI middleware: reject request bodies over ``max_bytes`` with 413 and a typed error."""

    def __init__(self, app: ASGIApp, *, max_bytes: int):
        self._app = app
        self.max_bytes = max_bytes

    async def _too_large(self, send: Callable, got: str) -> None:
        body = ErrorBody(
            error="MessageFormatError",
            message=f"request body must be <= {self.max_bytes} bytes (got {got})",
        ).model_dump_json().encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self._app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared > self.max_bytes:
                    await self._too_large(send, f"{declared}")
                    return
        chunks: list[bytes] = []
        total = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.max_bytes:
                await self._too_large(send, f"more than {self.max_bytes}")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        sent = False

        async def replay() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self._app(scope, replay, send)


BINARY_BODY = {"requestBody": {"required": True,
                               "content": {OCTET: {"schema": {"type": "string",
                                                              "format": "binary"}}}}}


def _error(exc: SecfedError) -> JSONResponse:
    body = ErrorBody(error=type(exc).__name__, message=str(exc))
    return JSONResponse(status_code=status_for(exc), content=body.model_dump())


def _caller_of(allowed: Container[str]) -> Callable[[Request], str]:
    """The authenticated caller of a request: its client certificate's enterprise id, which
    must be on ``allowed``."""

    def caller(request: Request) -> str:
        peer = request.scope.get("extensions", {}).get(PEER_KEY)
        if peer is None:
            raise TransportError("client certificate must be presented over TLS (got none)")
        if "id" not in peer:
            raise TransportError(peer.get("error", "client identity must be verifiable"))
        if peer["id"] not in allowed:
            raise TransportError(f"enterprise id must be on the allow-list (got {peer['id']!r})")
        return peer["id"]

    return caller


def _check_stage(stage: str) -> None:
    if stage not in STAGES:
        from secfed.errors import MessageFormatError

        raise MessageFormatError(f"stage must be one of {STAGES} (got {stage!r})")


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for status codes whose body is an :class:`ErrorBody`."""
    return {code: {"model": ErrorBody} for code in codes}


def _stage_routes(app: FastAPI, service: FederationService, caller: Callable[[Request], str]
                  ) -> None:
    """The protocol's routes: health, the round's info, each stage's inbox and submissions."""

    @app.get("/v1/health")
    async def health(request: Request) -> dict[str, str]:
        return {"status": "ok", "caller": caller(request)}

    @app.get("/v1/round", response_model=RoundInfo,
             responses=_errors(403, 400))
    async def current_round(
        request: Request,
        after: int = Query(0, ge=0, le=2**62),
        wait: float = Query(0.0, ge=0.0, le=MAX_WAIT_S),
    ) -> RoundInfo:
        return await service.round_info(after=after, wait=wait, sender=caller(request))

    @app.get("/v1/rounds/{round_number}/inbox/{stage}",
             responses={200: {"content": {OCTET: {}}}, 425: {"description": "stage not open yet"},
                        **_errors(409, 410, 403)})
    async def inbox(
        request: Request,
        round_number: RoundNumber,
        stage: str,
        wait: float = Query(0.0, ge=0.0, le=MAX_WAIT_S),
    ) -> Response:
        sender = caller(request)
        _check_stage(stage)
        data = await service.inbox(sender=sender, round_number=round_number, stage=stage, wait=wait)
        if data is None:
            return Response(status_code=425)
        return Response(content=data, media_type=OCTET)

    @app.post("/v1/rounds/{round_number}/stages/{stage}", response_model=SubmitAck,
              openapi_extra=BINARY_BODY,
              responses=_errors(400, 403, 409, 410, 413))
    async def submit(request: Request, round_number: RoundNumber, stage: str) -> SubmitAck:
        sender = caller(request)
        _check_stage(stage)
        from secfed.errors import MessageFormatError

        body = await request.body()
        envelope = Envelope.from_bytes(body)
        if envelope.round_number != round_number or envelope.stage != stage:
            raise MessageFormatError(
                f"envelope round/stage must match the URL ({round_number}/{stage}) "
                f"(got {envelope.round_number}/{envelope.stage})"
            )
        return await service.submit(sender=sender, envelope=envelope)

    @app.post("/v1/rounds/{round_number}/stages/{stage}/exchange",
              openapi_extra=BINARY_BODY,
              responses={200: {"content": {OCTET: {}},
                               "description": "accepted; the caller's input for stage `next`"},
                         202: {"model": SubmitAck,
                               "description": "accepted; stage `next` not open within `wait`"},
                         **_errors(400, 403, 409, 410, 413)})
    async def exchange(
        request: Request,
        round_number: RoundNumber,
        stage: str,
        next: str = Query(..., description="the stage whose input to wait for"),  # noqa: A002
        wait: float = Query(0.0, ge=0.0, le=MAX_WAIT_S),
    ) -> Response:
        """Submit this stage's message and long-poll the next stage's input in one round trip
        (same checks and idempotence as the two calls it stands for)."""
        _check_stage(next)
        ack = await submit(request, round_number, stage)
        data = await service.inbox(sender=caller(request), round_number=round_number,
                                   stage=next, wait=wait)
        if data is None:
            return JSONResponse(status_code=202, content=ack.model_dump())
        return Response(content=data, media_type=OCTET,
                        headers={"x-secfed-sha256": ack.sha256,
                                 "x-secfed-duplicate": "1" if ack.duplicate else "0"})


def _round_routes(app: FastAPI, service: FederationService, caller: Callable[[Request], str]
                  ) -> None:
    """A round's other routes: confirmations, refusals, readiness, outcomes, aggregates."""

    @app.post("/v1/rounds/{round_number}/applied", response_model=SubmitAck,
              responses=_errors(400, 403, 409))
    async def applied(request: Request, round_number: RoundNumber,
                      confirmation: AppliedConfirmation) -> SubmitAck:
        sender = caller(request)
        return await service.confirm(sender=sender, round_number=round_number,
                                     confirmation=confirmation)

    @app.post("/v1/rounds/{round_number}/refusal", response_model=SubmitAck,
              responses=_errors(400, 403, 409, 410))
    async def refusal(request: Request, round_number: RoundNumber, refusal: RoundRefusal) -> SubmitAck:
        sender = caller(request)
        return await service.refuse(sender=sender, round_number=round_number, refusal=refusal)

    @app.post("/v1/ready", response_model=RoundInfo,
              responses=_errors(400, 403))
    async def ready(request: Request, body: SiteReady) -> RoundInfo:  # noqa: ARG001
        return await service.ready(sender=caller(request))

    @app.get("/v1/rounds/{round_number}/outcome", response_model=RoundOutcome,
             responses=_errors(403, 409))
    async def outcome(request: Request, round_number: RoundNumber) -> RoundOutcome:
        caller(request)
        return await service.outcome(round_number=round_number)

    @app.get("/v1/rounds/{round_number}/aggregate",
             responses={200: {"content": {OCTET: {}}}, **_errors(403, 409)})
    async def aggregate(request: Request, round_number: RoundNumber) -> Response:
        sender = caller(request)
        data = await service.aggregate(sender=sender, round_number=round_number)
        return Response(content=data, media_type=OCTET)


def create_app(
    service: FederationService,
    *,
    allowed: Container[str],
    max_body: int,
    background: Callable[[], Awaitable[None]] | None = None,
    title: str = "secfed coordinator",
) -> Any:
    """The coordinator's ASGI app (FastAPI wrapped in :class:`BodyLimit`).

    ``background`` (the coordinator's round driver) runs for the app's lifetime.
    """

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(background()) if background else None
        try:
            yield
        finally:
            if task:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    app = FastAPI(title=title, version="1", lifespan=lifespan)

    @app.exception_handler(SecfedError)
    async def _typed(_request: Request, exc: SecfedError) -> JSONResponse:
        return _error(exc)

    caller = _caller_of(allowed)
    _stage_routes(app, service, caller)
    _round_routes(app, service, caller)
    return BodyLimit(app, max_bytes=max_body)


async def serve(
    app: Any,
    *,
    host: str,
    port: int,
    cert: Path,
    key: Path,
    ca: Path,
    stop: asyncio.Event,
    log_level: str = "warning",
    crl: Path | None = None,
    on_tls_reload: Callable[[str], None] | None = None,
    sock: Any = None,
    graceful_s: float | None = None,
) -> None:
    """Run ``app`` on ``host:port`` with mutual TLS until ``stop`` is set.

    The TLS context is ours (:class:`~secfed.transport.tls.ReloadingServerContext`: TLS 1.3
    only, client certificates checked against ``ca`` and ``crl``), not uvicorn's default; it
    picks up renewed certificates and revocations from the next connection on.

    ``sock``: an already bound listening socket (``secfed.transport.status_http.bind``: a busy
    port is then one error line before anything starts); the caller then owns the signals too
    (uvicorn installs no handler). ``graceful_s``: at most this long for open requests (long
    polls) to finish after ``stop`` (None: wait for them all).
    """
    import uvicorn

    tls = ReloadingServerContext(cert=cert, key=key, ca=ca, crl=crl, on_reload=on_tls_reload)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        http=PeerCertH11Protocol,
        ssl_certfile=str(cert),  # is_ssl (https scheme); the context is the factory's
        ssl_context_factory=lambda _config, _default: tls,
        log_level=log_level,
        lifespan="on",
        timeout_keep_alive=30,
        access_log=False,
        timeout_graceful_shutdown=graceful_s,
    )
    if sock is None:
        server = uvicorn.Server(config)
    else:
        from secfed.transport.status_http import _NoSignals

        class _Server(_NoSignals, uvicorn.Server):
            pass

        server = _Server(config)
    task = asyncio.create_task(server.serve(sockets=None if sock is None else [sock]))
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    server.should_exit = True
    stopper.cancel()
    await task
