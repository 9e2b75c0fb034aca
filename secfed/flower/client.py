"""The site's Flower ClientApp: one secfed participant per node, driven by Flower messages.

Each node is one enterprise with its own startup kit (``node_config["kit"]``, or in simulation
the kit of its ``partition-id``), its site policy, its privacy ledger and its SQLite state. The
participant is secfed's own :class:`~secfed.participant.loop.Participant` -- every check before
any secret, the ledger charged and committed before the update exists, signed receipts kept --
running in a thread whose coordinator calls are answered by :class:`FlowerBridge`.

The round's ephemeral secrets live only in that participant's memory, as over HTTPS; they are
never put into Flower's node ``Context`` (which Flower moves between processes). So the process
that runs the ClientApp must live as long as the run and serve each site from one process: in
simulation one Ray actor for all virtual nodes (:data:`SIMULATION_BACKEND`); a second process
that tries to open the same site is refused by the kit's lock file.
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from secfed.crypto.keys import share_verifications
from secfed.errors import ConfigError, SecfedError
from secfed.flower.bridge import Answer, FlowerBridge
from secfed.flower.wire import IDENTITY, OUTCOME, STEPS, pack, sign_advert, step_of, unpack
from secfed.transport.api import RoundInfo, RoundOutcome

__all__ = ["SiteSession", "make_client_app", "session_for", "close_sessions",
           "SIMULATION_BACKEND", "SiteFactory"]

# One actor: every virtual node's participant (and its in-memory round secrets) stays in the
# process that answers its messages.
SIMULATION_BACKEND: dict[str, Any] = {
    "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
    "init_args": {"num_cpus": 1, "log_to_driver": False},
}
LOCK_FILE = "flower-node.lock"
ANSWER_S = 3600.0  # longest a step waits for its participant (training is in the upload step)

SiteFactory = Callable[[Any], Any]  # EnterpriseKit -> LocalSite


def synthetic_site(kit: Any) -> Any:
    from secfed.participant.adapter import SyntheticSite

    return SyntheticSite(kit.root, kit.enterprise_id, kit.federation.model)


class SiteSession:
    """One site's participant thread and its bridge.

    Raises:
        ConfigError: another process already serves this kit (its lock file is held).
        LedgerError: the ledger is missing (see :class:`Participant`).
    """

    def __init__(self, kit_dir: Path, *, site_factory: SiteFactory = synthetic_site,
                 new_ledger: bool = False):
        from secfed.federation.kits import EnterpriseKit
        from secfed.participant.loop import Participant

        self.kit = EnterpriseKit.load(kit_dir)
        self._lock = _take_lock(self.kit.root / LOCK_FILE)
        self.bridge = FlowerBridge()
        self.finished = threading.Event()  # the participant's loop has ended
        try:
            self.participant = Participant(self.kit, site_factory(self.kit),
                                           events=self._event, new_ledger=new_ledger)
        except BaseException:
            os.close(self._lock)
            raise
        self.participant.client.close()  # its HTTPS client is never used: Flower carries it
        self.participant.client = self.bridge  # type: ignore[assignment]
        self.identity = self.participant.identity
        # the ledger's accountant (Opacus + torch) loads now, with the node, not in the first
        # round's charge (which the upload waits for)
        from secfed.privacy.accounting import load_accountant

        load_accountant()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"secfed-flower-{self.kit.enterprise_id}")
        self._thread.start()

    def _event(self, event: dict[str, Any]) -> None:
        if event.get("event") == "round_report":
            self.bridge.report(int(event["round"]), json.dumps(
                {k: event.get(k) for k in ("round", "status", "mode", "survivors", "epsilon",
                                           "detail")}, default=str).encode())

    def _run(self) -> None:
        try:
            self.participant.run()
        except SecfedError as exc:
            self.bridge.fail(f"{type(exc).__name__}: {exc}")
        except BaseException as exc:  # reported to the server as this node's error
            self.bridge.fail(f"{type(exc).__name__}: {exc}")
        finally:
            self.participant.close()
            self.finished.set()

    def close(self) -> None:
        self.bridge.close()
        self._thread.join(timeout=10)
        os.close(self._lock)


def _take_lock(path: Path) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(
            f"site kit {path.parent} must be served by one process (its {LOCK_FILE} is held by "
            "another): run one ClientApp process per site (simulation: one actor)") from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


_SESSIONS: dict[str, SiteSession] = {}
_SESSIONS_LOCK = threading.Lock()


@functools.lru_cache(maxsize=65536)
def _resolved(kit_dir: str) -> str:
    # one realpath per kit, not one per message (each is a syscall per path component)
    return str(Path(kit_dir).resolve())


def session_for(kit_dir: Path, *, site_factory: SiteFactory = synthetic_site,
                new_ledger: bool = False) -> SiteSession:
    key = _resolved(str(kit_dir))
    with _SESSIONS_LOCK:
        session = _SESSIONS.get(key)
        if session is None:
            if _SESSIONS:
                # this process hosts several sites (simulation: one actor for all): a signature
                # that many of them check is verified once (secfed.crypto.keys)
                share_verifications()
            session = SiteSession(Path(kit_dir), site_factory=site_factory, new_ledger=new_ledger)
            _SESSIONS[key] = session
        return session


def close_sessions() -> None:
    with _SESSIONS_LOCK:
        for session in _SESSIONS.values():
            session.close()
        _SESSIONS.clear()


def _kit_of(context: Any, kits: list[str] | None) -> Path:
    node = context.node_config
    if "kit" in node:
        return Path(str(node["kit"]))
    if kits is None and "kits-dir" in context.run_config:  # flwr run: the sites' kits by name
        root = Path(str(context.run_config["kits-dir"]))
        kits = sorted(str(p.parent) for p in root.glob("*/site.toml"))
    if kits is not None and "partition-id" in node:
        index = int(node["partition-id"])
        if not 0 <= index < len(kits):
            raise ConfigError(f"partition-id must be < {len(kits)} kits (got {index})")
        return Path(kits[index])
    raise ConfigError("node_config must name this site's kit (kit=\"/path/to/kit\")")


def answer(session: SiteSession, step: str, fields: dict[str, Any], node_id: int) -> Answer:
    """This site's answer to one step's message fields."""
    if step == IDENTITY:
        nonce, fed = bytes(fields["nonce"]), session.kit.federation.name
        sig = sign_advert(session.identity, federation=fed, node_id=node_id, nonce=nonce,
                          enterprise=session.kit.enterprise_id)
        return Answer("advert", json.dumps({"enterprise": session.kit.enterprise_id,
                                            "signature": sig.hex()}).encode())
    r = int(fields["round"])
    info = RoundInfo.model_validate_json(fields["info"]) if "info" in fields else None
    outcome = (RoundOutcome.model_validate_json(fields["outcome"])
               if "outcome" in fields else None)
    if step not in (OUTCOME, "advertise") and "deadline" in fields:
        session.bridge.set_stage_deadline(step, float(fields["deadline"]))
    return session.bridge.deliver(round_number=r, step=step, payload=bytes(fields.get("payload", b"")),
                                  info=info, outcome=outcome, timeout=ANSWER_S)


def make_client_app(*, kits: list[str] | None = None, site_factory: SiteFactory = synthetic_site,
                    new_ledger: bool = False, mods: list[Any] | None = None) -> Any:
    """A Flower ``ClientApp`` with one query handler per secfed step.

    Args:
        kits: enterprise kit directories by simulation ``partition-id`` (deployment nodes name
            theirs in ``node_config["kit"]``).
        site_factory: the site's model (default: a synthetic stand-in).
        new_ledger: start a fresh ledger for a kit that has none (never one that took part).
        mods: Flower mods wrapped around every handler (e.g. fault injection in tests).
    """
    from flwr.app import Context, Message
    from flwr.clientapp import ClientApp

    app = ClientApp(mods=mods or [])

    def handler(message: Message, context: Context) -> Message:
        step = step_of(message.metadata.message_type)
        fields = unpack(message.content)
        try:
            if "kit" in context.node_config:  # deployment: the site's own agent process
                from secfed.flower.agent import relay

                kind, payload = relay(str(context.node_config["kit"]), step, fields,
                                      context.node_id, ANSWER_S)
                reply = Answer(kind, payload)
            else:  # simulation: the participant lives in this (one) actor process
                session = session_for(_kit_of(context, kits), site_factory=site_factory,
                                      new_ledger=new_ledger)
                reply = answer(session, step, fields, context.node_id)
        except SecfedError as exc:
            reply = Answer("error", f"{type(exc).__name__}: {exc}".encode())
        return Message(pack(kind=reply.kind, payload=reply.payload), reply_to=message)

    for step in STEPS:
        app.query(f"secfed_{step}")(handler)
    return app
