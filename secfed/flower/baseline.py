"""Flower's own SecAgg+ (``SecAggPlusWorkflow`` + ``secaggplus_mod``) on the same simulation
engine, for the scale benchmark: the same n, d, rounds, synthetic updates and dropped sites.

Flower's neighbourhood is set like secfed's for the same n: ``num_shares`` = k + 1 (secfed's
:func:`~secfed.protocol.spec.default_neighbours`, the party itself included) and
``reconstruction_threshold`` = t + 1 (secfed's per-neighbourhood threshold t plus the
responder), ``max_weight`` = 1 (every site weighs 1; Flower's default 1000 would scale the
updates by 1/1000 before its quantisation and lose three digits of the sum). Sites of ``dropped`` answer Flower's ``unmask`` stage with an error (they vanish
right after uploading their masked vector), as :func:`secfed.flower.simulate.
drop_after_upload_mod` does for secfed's later steps.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from secfed.flower.simulate import CountingGrid, drop_after_upload_mod, quiet_stdout

__all__ = ["run_flower_secaggplus"]


def _flower_after_upload(message: Any) -> bool:
    from flwr.common.secure_aggregation.secaggplus_constants import (
        RECORD_KEY_CONFIGS,
        Key,
        Stage,
    )

    record = message.content.config_records.get(RECORD_KEY_CONFIGS) if message.has_content() else None
    return record is not None and record.get(Key.STAGE) == Stage.UNMASK


def run_flower_secaggplus(*, enterprises: int, dim: int, rounds: int = 1,
                          dropped: set[int] | frozenset[int] = frozenset(),
                          started: Callable[[], None] | None = None) -> dict[str, Any]:
    """One Flower SecAgg+ run; the same figures as :func:`secfed.flower.simulate.simulate`
    (``max_abs_error``: the last round's aggregate -- Flower's weighted mean times the number of
    results it averaged, its own quantisation included -- against the plaintext sum of those
    sites' updates). ``started`` is called when the workflow starts (after Ray's start-up), so
    a caller that has to kill a run can still bound its round time from below."""
    from flwr.client import NumPyClient
    from flwr.client.mod import secaggplus_mod
    from flwr.clientapp import ClientApp
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from secfed.flower.client import SIMULATION_BACKEND
    from secfed.participant.adapter import synthetic_update
    from secfed.protocol.spec import default_neighbours

    ids = [f"enterprise-{i:04d}" for i in range(enterprises)]
    k = default_neighbours(enterprises)
    t = math.floor(2 * (k + 1) / 3)
    result: dict[str, Any] = {}

    class Site(NumPyClient):  # type: ignore[misc]
        def __init__(self, eid: str):
            self.eid = eid

        def fit(self, parameters: Any, config: Any) -> Any:
            r = int(config.get("round", 1)) if config else 1
            return [synthetic_update(self.eid, r, dim).astype(np.float32)], 1, {}

    def client_fn(context: Any) -> Any:
        return Site(ids[int(context.node_config["partition-id"])]).to_client()

    mods = [drop_after_upload_mod(set(dropped), is_after_upload=_flower_after_upload)] if dropped else []
    client = ClientApp(client_fn=client_fn, mods=[*mods, secaggplus_mod])
    server = ServerApp()

    class Capture(FedAvg):  # type: ignore[misc]
        """FedAvg that keeps the last aggregate and how many results went into it."""

        def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> Any:
            out = super().aggregate_fit(server_round, results, failures)
            if out[0] is not None:
                result["mean"] = parameters_to_ndarrays(out[0])[0].astype(np.float64)
                result["round"], result["averaged"] = server_round, len(results)
            return out

    @server.main()
    def main(grid: Any, context: Any) -> None:
        counting = CountingGrid(grid)
        strategy = Capture(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=enterprises,
                          min_available_clients=enterprises,
                          initial_parameters=ndarrays_to_parameters([np.zeros(dim, np.float32)]),
                          on_fit_config_fn=lambda r: {"round": r})
        legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=rounds),
                               strategy=strategy)
        # max_weight = 1: each site's weight (num_examples) is 1, so nothing is lost to Flower's
        # default scaling by 1/1000 before quantisation (its best precision for this sum).
        workflow = DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(
            num_shares=k + 1, reconstruction_threshold=t + 1, max_weight=1.0))
        start_cpu, start = time.process_time(), time.perf_counter()
        if started is not None:
            started()
        workflow(counting, legacy)
        result["wall_s"] = time.perf_counter() - start
        result["cpu_s"] = time.process_time() - start_cpu
        result["grid"] = counting

    with quiet_stdout():
        run_simulation(server_app=server, client_app=client, num_supernodes=enterprises,
                       backend_config=SIMULATION_BACKEND)
    grid = result.get("grid")
    if grid is None:
        return {"engine": "flower-simulation (ray)", "workflow": "flower SecAggPlusWorkflow",
                "enterprises": enterprises, "error": "run did not finish"}
    total = sum(grid.sent.values()) + sum(grid.received.values())
    error = None
    if "mean" in result:  # every site uploaded (drops come after upload): all n are averaged
        plain = np.zeros(dim, np.float64)
        for eid in ids:
            plain += synthetic_update(eid, result["round"], dim).astype(np.float64)
        error = float(np.max(np.abs(result["mean"] * result["averaged"] - plain)))
    return {
        "engine": "flower-simulation (ray)", "workflow": "flower SecAggPlusWorkflow",
        "enterprises": enterprises, "dim": dim, "rounds": rounds, "dropped": len(dropped),
        "num_shares": k + 1, "reconstruction_threshold": t + 1,
        "round_s": [round(result["wall_s"] / rounds, 3)],
        "coordinator_cpu_s": round(result["cpu_s"], 3),
        "bytes_per_enterprise": round(total / enterprises / rounds),
        "max_abs_error": error,
        "survivors": [result.get("averaged")],
    }
