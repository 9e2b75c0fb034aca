"""An in-process Flower ``Grid`` for fast tests: every node's ClientApp is called directly in a
thread (no SuperLink, no Ray), with a persistent Context per node as Flower keeps one."""

from __future__ import annotations

import itertools
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any

from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity


class LocalGrid:
    def __init__(self, client_app: Any, n: int, *, node_ids: list[int] | None = None,
                 node_config: list[dict[str, Any]] | None = None,
                 run_config: dict[str, Any] | None = None):
        self.app = client_app
        TaskIdentity.run_id = 1  # what a real ServerApp process is given
        TaskIdentity.node_id = 1
        TaskIdentity.task_id = 1
        self.nodes = node_ids or [1000 + i for i in range(n)]
        configs = node_config or [{"partition-id": i, "num-partitions": n} for i in range(n)]
        self.contexts = {
            node: Context(run_id=1, node_id=node, node_config=configs[i], state=RecordDict(),
                          run_config=dict(run_config or {}))
            for i, node in enumerate(self.nodes)
        }
        self._ids = itertools.count(1)
        self.pool = ThreadPoolExecutor(max_workers=max(4, n))

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def _one(self, message: Message) -> Message:
        node = message.metadata.dst_node_id
        message.metadata.__dict__["_message_id"] = f"m{next(self._ids)}"
        message.metadata.__dict__["_src_node_id"] = 1
        reply = self.app(message, self.contexts[node])
        return reply

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Message]:
        futures = [self.pool.submit(self._one, m) for m in messages]
        done, _ = wait(futures, timeout=timeout)
        return [f.result() for f in futures if f in done and f.exception() is None]


def run_local(root: Any, *, enterprises: int, dim: int, schedule: tuple[str, ...], rounds: int,
              dropped: set[int] = frozenset(), mods: list[Any] | None = None,
              node_config: list[dict[str, Any]] | None = None, events: list | None = None,
              agents: bool = False, by_run_config: bool = False):
    """Kits + secfed's workflow over a LocalGrid; (kits, summary)."""
    from pathlib import Path

    from secfed.flower.client import close_sessions, make_client_app
    from secfed.flower.server import SecfedWorkflow
    from secfed.flower.simulate import _secfed_after_upload, drop_after_upload_mod, make_kits

    kits = make_kits(Path(root) / "kits", enterprises=enterprises, dim=dim, mode=schedule[0],
                     rounds=rounds, schedule=schedule)
    ids = sorted(kits.enterprises)
    all_mods = list(mods or [])
    if dropped:
        all_mods.append(drop_after_upload_mod(set(dropped), is_after_upload=_secfed_after_upload))
    app = make_client_app(kits=None if by_run_config else [str(kits.enterprises[e]) for e in ids],
                          new_ledger=True, mods=all_mods)
    threads, stop = [], threading.Event()
    if agents:  # each site's own participant process, here a thread serving its kit's socket
        from secfed.flower.agent import serve, socket_path

        node_config = [{"kit": str(kits.enterprises[e])} for e in ids]
        for e in ids:
            t = threading.Thread(target=serve, args=(kits.enterprises[e],),
                                 kwargs={"new_ledger": True, "stop": stop}, daemon=True)
            t.start()
            threads.append(t)
        for e in ids:
            while not socket_path(kits.enterprises[e]).exists():
                time.sleep(0.05)
    run_config = {"kits-dir": str(Path(root) / "kits")} if by_run_config else None
    grid = LocalGrid(app, enterprises, node_config=node_config, run_config=run_config)
    sink = events.append if events is not None else None
    try:
        summary = SecfedWorkflow(kits.coordinator, events=sink, step_timeout=60)(grid)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=20)
        close_sessions()
        grid.pool.shutdown(wait=False)
    return kits, summary
