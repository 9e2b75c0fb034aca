"""Soak (issue 19 item 5): 20 enterprises x 200 rounds at d = 1e4 over mutual TLS with random
dropouts (each site drops out after its upload in 2 % of its rounds). A real coordinator and 20
site processes running secfed's participant loop (``bench/soak.py``). Resident memory of the
coordinator and of every site grows by at most 10 % after 20 warm-up rounds; every round ends
done or aborted and the last one is done; every finished round's sum is exact in every site's
adapter; no ledger entry is lost or doubled; ``secfed audit`` passes over every ledger, the
transcript and the outbound logs. Hours on a shared 2-core machine: ``make test-slow`` only."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SOAK = Path(__file__).resolve().parents[2] / "bench" / "soak.py"


def _soak_module():
    spec = importlib.util.spec_from_file_location("secfed_bench_soak", SOAK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.timeout(6 * 3600)
def test_soak_20_sites_200_rounds_memory_flat_audit_passes(tmp_path) -> None:
    figures = _soak_module().soak(tmp_path, sites=20, rounds=200, dim=10_000, drop=0.02,
                                  warmup=20)
    print(json.dumps(figures, sort_keys=True))
    assert set(figures["exit_codes"].values()) == {0}, figures
    assert figures["done"] + figures["aborted"] == 200 and figures["other"] == [], figures
    assert figures["last_round_done"], figures
    assert figures["done"] >= 150, figures  # dropouts are tolerated, not a reason to abort
    assert figures["dropouts"] > 0, figures  # the dropouts really happened
    assert figures["max_adapter_error"] <= 1e-4, figures
    assert figures["ledger_entries_lost"] == 0 and figures["ledger_entries_doubled"] == 0, figures
    assert figures["coordinator_growth"] <= 0.10, figures
    assert figures["site_growth_max"] <= 0.10, figures
    assert figures["audit"]["exit_code"] == 0 and figures["audit"]["verdict"] == "pass", figures
