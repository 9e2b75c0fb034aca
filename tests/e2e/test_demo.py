"""``make demo`` at the tiny scale: the whole pipeline (data, model, kits, 4 processes, 20 rounds
of three secagg then one ckks, head-only DP-SGD on tower features, audit) finishes, every
enterprise takes part in every round within budget."""

from __future__ import annotations

import json

import pytest

from secfed.demo import DemoSettings, run_demo

pytestmark = pytest.mark.slow


def test_demo_runs_end_to_end_at_tiny_scale(tmp_path) -> None:
    out = tmp_path / "demo-out"
    settings = DemoSettings(scale="tiny", local_steps=4)
    result = run_demo(out, settings=settings, say=lambda _m: None)
    rounds = list(range(1, settings.rounds + 1))
    assert sorted(result.rounds) == rounds
    modes = [next(iter(result.rounds[r].values()))["mode"] for r in rounds]
    assert modes == ["secagg", "secagg", "secagg", "ckks"] * (settings.rounds // 4)
    for r in rounds:
        assert {v["status"] for v in result.rounds[r].values()} == {"done"}
        # every site applied the same global model, so they score the same on the test set
        assert len({v["accuracy"] for v in result.rounds[r].values()}) == 1
    eps = [[v["epsilon"] for v in result.rounds[r].values()] for r in rounds]
    assert all(0 < e <= 8.0 for e in eps[-1])
    assert all(a < b for a, b in zip([e[0] for e in eps], [e[0] for e in eps[1:]], strict=False))
    assert [e["event"] for e in result.coordinator_rounds] == ["round_done"] * settings.rounds
    assert result.report is not None
    report = json.loads((result.report / "report.json").read_text())
    assert report["verdict"] == "pass"
    fed = (out / "kits" / "coordinator" / "federation.toml").read_text()
    assert 'trainable = "head"' in fed and 'optimizer = "adam"' in fed
