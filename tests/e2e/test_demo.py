"""``make demo`` at the tiny scale: the whole pipeline (data, model, kits, 4 processes, 3 secagg
+ 1 ckks rounds, audit) finishes, every enterprise takes part in every round within budget."""

from __future__ import annotations

import json

import pytest

from secfed.demo import DemoSettings, run_demo

pytestmark = pytest.mark.slow


def test_demo_runs_end_to_end_at_tiny_scale(tmp_path) -> None:
    out = tmp_path / "demo-out"
    result = run_demo(out, settings=DemoSettings(scale="tiny", local_steps=4), say=lambda _m: None)
    assert sorted(result.rounds) == [1, 2, 3, 4]
    modes = [next(iter(result.rounds[r].values()))["mode"] for r in (1, 2, 3, 4)]
    assert modes == ["secagg", "secagg", "secagg", "ckks"]
    for r in (1, 2, 3, 4):
        assert {v["status"] for v in result.rounds[r].values()} == {"done"}
    eps = [v["epsilon"] for v in result.rounds[4].values()]
    assert all(0 < e <= 8.0 for e in eps)
    assert [e["event"] for e in result.coordinator_rounds] == ["round_done"] * 4
    assert result.report is not None
    report = json.loads((result.report / "report.json").read_text())
    assert report  # the audit wrote its JSON (its own tests check the content)
