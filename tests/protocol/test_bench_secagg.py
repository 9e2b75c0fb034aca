"""Smoke test of bench/secagg.py: the quick run completes and reports every required figure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "secagg.py"


@pytest.mark.slow
def test_quick_bench_reports_required_keys() -> None:
    out = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--json"], capture_output=True, text=True, check=True,
        timeout=600,
    )
    report = json.loads(out.stdout)
    for key in ("ours_participant_s", "flower_participant_s", "ours_coordinator_s",
                "flower_coordinator_s", "keystream_gbps", "bytes_per_param", "ckks"):
        assert report[key] is not None, key
    assert report["ours_max_abs_error"] < 1e-5 and report["flower_max_abs_error"] < 1e-3
    assert 8.0 <= report["bytes_per_param"]["ring64"] < 8.1
    assert 4.0 <= report["bytes_per_param"]["ring32"] < 4.1
    methods = {(row["tensor_list"], row["method"]) for row in report["ckks"]}
    assert len(methods) == 4
    assert [p["n"] for p in report["scale_curve"]] == [10, 30]
