"""``make demo`` at the tiny scale: the whole pipeline (data, model, kits, 4 processes, 20 rounds
of three secagg then one ckks, head-only DP-SGD on tower features, audit) finishes, every
enterprise takes part in every round within budget."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.request

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
    assert result.status_url is not None and result.status_url.startswith("http://127.0.0.1:")
    report = json.loads((result.report / "report.json").read_text())
    assert report["verdict"] == "pass"
    fed = (out / "kits" / "coordinator" / "federation.toml").read_text()
    assert 'trainable = "head"' in fed and 'optimizer = "adam"' in fed


def test_demo_keep_serving_shows_the_page_until_sigterm(tmp_path) -> None:
    """``secfed demo run --keep-serving``: the demo announces the status page, finishes its
    rounds and audit, keeps the page up, and stops the coordinator on SIGTERM."""
    cmd = [sys.executable, "-m", "secfed.cli.main", "demo", "run", "--scale", "tiny",
           "--local-steps", "4", "--keep-serving", "--out", str(tmp_path / "demo-out")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    up = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            if "stays up (--keep-serving)" in line:
                up.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert up.wait(900), "".join(lines[-20:])
        url = next(ln.split()[2] for ln in lines if ln.startswith("status page: http"))
        time.sleep(2.0)
        assert proc.poll() is None
        with urllib.request.urlopen(url + "status.json", timeout=10) as resp:
            snap = json.loads(resp.read())
        assert snap["completed"] == 20 and snap["round"]["status"] == "done"
        proc.terminate()
        assert proc.wait(timeout=60) == 0
        with pytest.raises(OSError):
            urllib.request.urlopen(url, timeout=5)  # the coordinator stopped with the demo
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
