"""The coordinator: drives rounds with the protocol state machines, transport and SQLite state.

Front door: :func:`run_coordinator` (what ``secfed aggregate`` calls).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from urllib.parse import urlsplit

from secfed.coordinator.service import Coordinator, EventSink
from secfed.names import CKKS_SLOTS
from secfed.transport.kits import CoordinatorKit

__all__ = ["Coordinator", "run_coordinator", "max_body_bytes"]

CKKS_CIPHERTEXT_BYTES = 300_000  # one N=8192, [60, 60] ciphertext serialises to ~262 KB
LINGER_S = 3.0


def max_body_bytes(vector_length: int) -> int:
    """Largest upload the server accepts: the bigger of the masked and the CKKS upload + slack."""
    masked = 8 * vector_length
    ckks = -(-vector_length // CKKS_SLOTS) * CKKS_CIPHERTEXT_BYTES
    return int(max(masked, ckks) * 1.25) + (1 << 20)


def run_coordinator(kit_dir: str | Path, *, events: EventSink | None = None,
                    log_level: str = "warning", durable: bool = False) -> None:
    """Serve the coordinator's HTTPS API and drive every round of the federation in the kit.

    Returns when the federation's last round is done (or on KeyboardInterrupt).
    """
    from secfed.transport.server import create_app, serve

    kit = CoordinatorKit.load(kit_dir)
    coordinator = Coordinator(kit, events=events, durable=durable)
    url = urlsplit(kit.federation.coordinator_url)

    async def main() -> None:
        done = asyncio.Event()

        async def drive() -> None:
            try:
                await coordinator.run()
            finally:
                done.set()

        app = create_app(
            coordinator,
            allowed=frozenset(kit.federation.enterprise_ids()),
            max_body=max_body_bytes(kit.federation.model.vector_length),
            background=drive,
        )
        stop = asyncio.Event()

        async def linger() -> None:
            await done.wait()
            await asyncio.sleep(LINGER_S)  # let participants fetch the last outcome
            stop.set()

        lingering = asyncio.create_task(linger())
        try:
            await serve(app, host=url.hostname or "127.0.0.1", port=url.port or 443,
                        cert=kit.cert, key=kit.key, ca=kit.ca, stop=stop, log_level=log_level)
        finally:
            lingering.cancel()
            coordinator.state.close()

    asyncio.run(main())
