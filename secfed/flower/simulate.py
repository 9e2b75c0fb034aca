"""``secfed flower simulate``: a whole federation of synthetic sites on Flower's simulation engine.

Kits are made for ``enterprises`` sites (enrolment in-process, as in tests and benches), each
site runs secfed's participant with a synthetic update (:func:`~secfed.participant.adapter.
synthetic_update`), the coordinator runs as the ServerApp workflow, and Flower's Ray backend
carries every message. ``drop`` makes that fraction of the sites vanish right after their
upload (their node answers every later message with an error). After the run the harness -- not
the coordinator, which never sees a plaintext -- decodes each round's stored aggregate and
compares it with the plaintext sum of the survivors' updates (``max_abs_error``).
"""

from __future__ import annotations

import collections
import contextlib
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from secfed.errors import ConfigError, ProtocolError
from secfed.flower.wire import content_bytes, step_of
from secfed.names import MODES, Stage

__all__ = ["simulate", "CountingGrid", "drop_after_upload_mod", "AFTER_UPLOAD",
           "make_kits", "quiet_stdout"]

# the steps a site dropped after upload misses
AFTER_UPLOAD = tuple(s.value for s in (Stage.CONSISTENCY, Stage.UNMASK, Stage.DONE))


# Messages in flight at once on the simulation engine. Flower's engine (flwr 1.42, vce_api
# add_messages_to_queue) scans every stored message for every node every 0.1 s, so n messages
# pushed at once cost O(n^2) per scan in the ServerApp process for the whole step; a window of W
# keeps it O(n W). The engine also takes at most W new messages per scan, so a step of n
# messages lasts at least n / W scans: once the sites' own work per message fell to a few ms
# (shared signature checks) that floor, not the sites, set the round at n = 100 (16: 7.6-9.0 s,
# 32: 6.4-7.6 s, 64: 6.9-7.8 s, none: 6.2-6.8 s). Wider windows up to n = 200, 16 beyond.
SIM_WINDOW = 16
SIM_WINDOW_SMALL = 32  # n <= SIM_WINDOW_SMALL_N
SIM_WINDOW_SMALL_N = 200


def sim_window(enterprises: int) -> int:
    """Messages kept in flight for a federation of ``enterprises`` sites."""
    return SIM_WINDOW_SMALL if enterprises <= SIM_WINDOW_SMALL_N else SIM_WINDOW
SIM_PULL_S = 0.02  # how often the window is topped up (Flower's own grid polls every 0.1 s)


class CountingGrid:
    """A Flower ``Grid`` that counts each node's message bytes (content payloads, both ways)
    and, with ``window``, keeps at most that many messages in flight (a sliding window over
    ``push_messages`` / ``pull_messages``; ``timeout`` bounds the whole step as before)."""

    def __init__(self, grid: Any, *, window: int | None = None):
        self._grid = grid
        self.window = window
        self.sent: dict[int, int] = {}
        self.received: dict[int, int] = {}
        self.in_flight_max = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> Any:
        messages = list(messages)
        for m in messages:
            node = m.metadata.dst_node_id
            self.sent[node] = self.sent.get(node, 0) + content_bytes(m.content)
        if self.window is None:
            replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        else:
            replies = self._windowed(messages, timeout)
        for m in replies:
            if m.has_content():
                node = m.metadata.src_node_id
                self.received[node] = self.received.get(node, 0) + content_bytes(m.content)
        return replies

    def _windowed(self, messages: list[Any], timeout: float | None) -> list[Any]:
        assert self.window is not None
        end = None if timeout is None else time.monotonic() + timeout
        waiting = collections.deque(messages)
        flying: set[str] = set()
        replies: list[Any] = []
        while waiting or flying:
            room = self.window - len(flying)
            if waiting and room > 0:
                batch = [waiting.popleft() for _ in range(min(room, len(waiting)))]
                flying.update(str(i) for i in self._grid.push_messages(batch))
                self.in_flight_max = max(self.in_flight_max, len(flying))
            got = list(self._grid.pull_messages(flying)) if flying else []
            replies.extend(got)
            flying.difference_update(m.metadata.reply_to_message_id for m in got)
            if (not waiting and not flying) or (end is not None and time.monotonic() >= end):
                break
            if not got:
                time.sleep(SIM_PULL_S)
        return replies


def drop_after_upload_mod(partitions: set[int], *, is_after_upload: Callable[[Any], bool]) -> Any:
    """A Flower mod: the nodes of ``partitions`` answer every message after their upload with
    an error, as a site that crashed right after uploading."""
    from flwr.app import Error, Message

    def mod(message: Any, context: Any, call_next: Any) -> Any:
        if int(context.node_config.get("partition-id", -1)) in partitions and is_after_upload(message):
            return Message(Error(code=0, reason="site dropped after upload"), reply_to=message)
        return call_next(message, context)

    return mod


def _secfed_after_upload(message: Any) -> bool:
    try:
        return step_of(message.metadata.message_type) in AFTER_UPLOAD
    except Exception:
        return False


@contextlib.contextmanager
def quiet_stdout() -> Iterator[None]:
    """Send fd 1 (Flower's and Ray's chatter) to stderr, so ``--json`` prints one document."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def make_kits(root: Path, *, enterprises: int, dim: int, mode: str, rounds: int,
              schedule: tuple[str, ...] | None = None) -> Any:
    from secfed.config import Deadlines, DPSettings
    from secfed.federation.kits import create_kits
    from secfed.federation.plan import model_settings_for

    ids = [f"enterprise-{i:04d}" for i in range(enterprises)]
    return create_kits(
        root, name="flower-sim", enterprises=ids, coordinator_url="https://127.0.0.1:9",
        model=model_settings_for(model_dir=None, synthetic_dim=dim), mode_schedule=schedule or (mode,),
        rounds=rounds, deadlines=Deadlines(train=3600, stage=3600, applied=3600),
        dp=DPSettings(noise_multiplier=1.0, sample_rate=0.01, local_steps=5),
    )


@dataclass
class _Holder:
    summary: Any = None
    cpu_s: float = 0.0
    grid: CountingGrid | None = None
    error: BaseException | None = None


def _max_abs_error(kits: Any, mode: str, dim: int) -> tuple[float, list[int]]:
    """Largest |decoded aggregate - plaintext sum of its survivors' updates| over done rounds."""
    from secfed.coordinator.state import CoordinatorState
    from secfed.federation.kits import CoordinatorKit
    from secfed.participant.adapter import synthetic_update

    ckit = CoordinatorKit.load(kits.coordinator)
    state = CoordinatorState(ckit.state)
    worst, survivors = 0.0, []
    try:
        for row in state.rounds():
            if row.status != "done":
                continue
            payload = state.aggregate(row.round)
            if payload is None:
                raise ProtocolError(f"round {row.round} has no stored aggregate")
            total, members = _decode(payload, ckit, kits, mode)
            plain = np.zeros(dim, np.float64)
            for eid in members:
                plain += synthetic_update(eid, row.round, dim).astype(np.float64)
            worst = max(worst, float(np.max(np.abs(total - plain))))
            survivors.append(len(members))
    finally:
        state.close()
    return worst, survivors


def _decode(payload: bytes, ckit: Any, kits: Any, mode: str) -> tuple[np.ndarray, tuple[str, ...]]:
    from secfed.crypto.encoding import decode
    from secfed.federation.kits import EnterpriseKit
    from secfed.protocol.messages import CkksAggregate, MaskedAggregate, decode_message
    from secfed.protocol.participant import open_ckks_aggregate

    model = ckit.federation.model
    message = decode_message(payload)
    if isinstance(message, MaskedAggregate):
        dtype = np.dtype(f"<u{message.ring_bits // 8}")
        ring = np.frombuffer(message.vector, dtype=dtype).astype(dtype.newbyteorder("="))
        return decode(ring, scale_bits=model.scale_bits), tuple(message.survivors)
    assert isinstance(message, CkksAggregate) and mode == "ckks"
    from secfed.crypto import ckks

    kit = EnterpriseKit.load(next(iter(kits.enterprises.values())))
    ctx = ckks.load_context(kit.ckks_secret.read_bytes(), expect_secret=True)
    roster = {e.id: e.public_key_bytes() for e in ckit.federation.roster}
    return open_ckks_aggregate(message, ckks_context=ctx, roster=roster,
                               vector_length=model.vector_length, scale_bits=model.scale_bits)


def simulate(*, enterprises: int, dim: int, mode: str, rounds: int = 1, drop: float = 0.0,
             workdir: str | Path | None = None,
             events: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run the federation on Flower's simulation engine; the measured figures (module doc).

    Raises:
        ConfigError: a setting out of range.
        ProtocolError: the run failed (the coordinator or the workflow raised).
    """
    if mode not in MODES:
        raise ConfigError(f"--mode must be one of {MODES} (got {mode!r})")
    if enterprises < 2 or dim < 1 or rounds < 1 or not 0.0 <= drop < 1.0:
        raise ConfigError(f"need enterprises >= 2, dim >= 1, rounds >= 1, 0 <= drop < 1 (got "
                          f"{enterprises}, {dim}, {rounds}, {drop})")
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="secfed-flower-"))
        root = Path(workdir)
        t0 = time.perf_counter()
        kits = make_kits(root / "kits", enterprises=enterprises, dim=dim, mode=mode, rounds=rounds)
        kit_s = time.perf_counter() - t0
        ids = sorted(kits.enterprises)
        dropped = set(range(enterprises - math.floor(drop * enterprises), enterprises))
        holder = run_on_simulation(kits, ids, dropped, events=events)
        error, survivors = _max_abs_error(kits, mode, dim)
    summary, grid = holder.summary, holder.grid
    assert grid is not None
    n = len(ids)
    total = sum(grid.sent.values()) + sum(grid.received.values())
    return {
        "engine": "flower-simulation (ray)", "enterprises": n, "dim": dim, "mode": mode,
        "rounds": rounds, "drop": drop, "dropped": len(dropped),
        "round_s": [round(s, 3) for s in summary.round_s],
        "coordinator_cpu_s": round(holder.cpu_s, 3),
        "coordinator_threads_cpu_s": (None if summary.coordinator_cpu_s is None
                                      else round(summary.coordinator_cpu_s, 3)),
        "bytes_per_enterprise": round(total / n / rounds),
        "bytes_up_per_enterprise": round(sum(grid.received.values()) / n / rounds),
        "max_abs_error": error,
        "survivors": survivors,
        "statuses": [r["status"] for r in summary.rounds],
        "kits_s": round(kit_s, 3),
    }


def run_on_simulation(kits: Any, ids: list[str], dropped: set[int], *,
                      events: Callable[[dict[str, Any]], None] | None = None) -> _Holder:
    """Run secfed's ServerApp workflow and ClientApp on Flower's simulation engine."""
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from secfed.flower.client import SIMULATION_BACKEND, make_client_app
    from secfed.flower.server import SecfedWorkflow

    holder = _Holder()
    server = ServerApp()

    @server.main()
    def main(grid: Any, context: Any) -> None:
        holder.grid = CountingGrid(grid, window=sim_window(len(ids)))
        start = time.process_time()
        try:
            holder.summary = SecfedWorkflow(kits.coordinator, events=events)(holder.grid, context)
        except BaseException as exc:  # handed to the caller below
            holder.error = exc
        holder.cpu_s = time.process_time() - start

    mods = [drop_after_upload_mod(dropped, is_after_upload=_secfed_after_upload)] if dropped else []
    client = make_client_app(kits=[str(kits.enterprises[e]) for e in ids], new_ledger=True,
                             mods=mods)
    with quiet_stdout():
        run_simulation(server_app=server, client_app=client, num_supernodes=len(ids),
                       backend_config=SIMULATION_BACKEND)
    if holder.error is not None:
        if isinstance(holder.error, ProtocolError | ConfigError):
            raise holder.error
        raise ProtocolError(f"flower run failed: {type(holder.error).__name__}: {holder.error}")
    if holder.summary is None:
        raise ProtocolError("flower run ended without the workflow's summary")
    return holder
