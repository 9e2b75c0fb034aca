"""An in-process Flower ``Grid`` for fast tests: every node's ClientApp is called directly in a
thread (no SuperLink, no Ray), with a persistent Context per node as Flower keeps one."""

from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any

from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity


class LocalGrid:
    def __init__(self, client_app: Any, n: int, *, node_ids: list[int] | None = None,
                 node_config: list[dict[str, Any]] | None = None):
        self.app = client_app
        TaskIdentity.run_id = 1  # what a real ServerApp process is given
        TaskIdentity.node_id = 1
        TaskIdentity.task_id = 1
        self.nodes = node_ids or [1000 + i for i in range(n)]
        configs = node_config or [{"partition-id": i, "num-partitions": n} for i in range(n)]
        self.contexts = {
            node: Context(run_id=1, node_id=node, node_config=configs[i], state=RecordDict(),
                          run_config={})
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
