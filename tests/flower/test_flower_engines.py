"""secfed on Flower's simulation engine, end to end (slow), through ``secfed flower simulate``.

The deployment engine harness (``tests/flower/deployment.py``: SuperLink with TLS and CLI-managed
node authentication, one SuperNode and one ``secfed flower site`` per site, ``flwr run`` of
``examples/flower``) completed 2 secagg+ rounds when run by hand, but its automated test did not
pass reliably yet, so it is not part of the suite."""

from __future__ import annotations

import json
import subprocess

import pytest

from .deployment import BIN


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["secagg+", "ckks"])
def test_simulation_engine_exact_sums_with_a_site_dropped_after_upload(mode, tmp_path):
    done = subprocess.run(
        [str(BIN / "secfed"), "flower", "simulate", "--enterprises", "6", "--dim", "2000",
         "--mode", mode, "--rounds", "2", "--drop", "0.17", "--json",
         "--workdir", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout)
    assert out["engine"] == "flower-simulation (ray)" and out["dropped"] == 1
    assert out["statuses"] == ["done", "done"]
    # round 1: the site dropped after its upload is in the sum; round 2: it is gone
    assert out["survivors"] == [6, 5]
    assert out["max_abs_error"] <= 1e-5
    assert len(out["round_s"]) == 2 and out["coordinator_cpu_s"] > 0
    assert out["bytes_per_enterprise"] > 2000 * 4  # at least one masked/encrypted upload each
