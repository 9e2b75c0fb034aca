"""``secfed demo run`` shows progress: sites ready and rounds done, from the processes' events
(plain lines here, as off a terminal; a rich bar on one)."""

from __future__ import annotations

import io
import json
from pathlib import Path

from secfed import progress
from secfed.demo import DemoSettings, _follow


class _Finished:
    def poll(self) -> int:
        return 0


def test_demo_follow_counts_ready_sites_and_finished_rounds(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv(progress.ENV, raising=False)
    logs = tmp_path / "logs"
    logs.mkdir()
    coordinator = [{"event": "round_opened", "round": 1, "mode": "secagg", "threshold": 2},
                   {"event": "round_done", "round": 1},
                   {"event": "round_aborted", "round": 2, "reason": "deadline"}]
    (logs / "coordinator.jsonl").write_text("".join(json.dumps(e) + "\n" for e in coordinator))
    for site in ("a", "b"):
        (logs / f"{site}.jsonl").write_text(
            "a warning a library printed\n"
            + json.dumps({"event": "training", "round": 1, "mode": "secagg"}) + "\n"
            + json.dumps({"event": "round_report", "round": 1, "status": "done",
                          "mode": "secagg", "metrics": {}}) + "\n")
    out = io.StringIO()
    progress.configure("plain", stream=out)
    try:
        result = _follow(tmp_path, {"coordinator": _Finished(), "a": _Finished(),
                                    "b": _Finished()}, DemoSettings(rounds=2), lambda m: None)
    finally:
        progress.configure("auto")
    lines = out.getvalue().splitlines()
    assert "secfed: demo: sites ready (data, model, features) (2): started" in lines
    assert "secfed: demo: rounds (2): started" in lines
    assert "secfed: demo: rounds: 1/2" in lines
    assert any(line.startswith("secfed: demo: rounds: done, 2/2 in ") for line in lines), lines
    assert any(line.startswith("secfed: demo: sites ready (data, model, features): done, 2/2")
               for line in lines), lines
    assert [r["round"] for r in result.coordinator_rounds] == [1, 2]
