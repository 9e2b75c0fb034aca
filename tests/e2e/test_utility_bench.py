"""``bench/utility.py`` end to end on the tiny scale: every row of the table is written, the
secure-aggregation row equals plaintext FedAvg, and LoRA through the towers runs too."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(work: Path, out: Path, *extra: str) -> str:
    cmd = [sys.executable, str(ROOT / "bench" / "utility.py"), "--scale", "tiny", "--size",
           "tiny", "--rounds", "2", "--no-tune", "--dp-repeats", "1", "--threads", "1",
           "--work", str(work), "--out", str(out), *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    # progress on stderr (plain lines: not a terminal), no transformers bars
    assert "secfed: utility rows (" in done.stderr and "secfed: utility rows: done, " in \
        done.stderr, done.stderr[-2000:]
    assert "Loading weights" not in done.stderr
    return (out / "utility.md").read_text()


def _rows(table: str) -> dict[str, tuple[str, str]]:
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.split("|")[1:-1]]
        if len(cells) == 4 and cells[0] not in ("setting", "---"):
            rows[cells[0]] = (cells[1], cells[2])
    return rows


@pytest.mark.slow
def test_utility_table_on_the_tiny_scale(tmp_path) -> None:
    work = tmp_path / "work"
    table = _run(work, tmp_path / "head")
    rows = _rows(table)
    names = {"centralized, non-private", "FedAvg plaintext", "FedAvg + SecAgg",
             *(f"DP-SGD + SecAgg, eps={e}" for e in (8, 4, 1)),
             *(f"local only: {n}" for n in ("city_operations", "energy_utility",
                                            "residential_security"))}
    assert set(rows) == names
    for noisy, clean in rows.values():
        assert 0.0 <= float(noisy) <= 1.0 and 0.0 <= float(clean) <= 1.0
    # the secure sum is the plaintext sum up to fixed-point quantisation: the same accuracy
    assert rows["FedAvg + SecAgg"] == rows["FedAvg plaintext"]
    diff = re.search(r"\| FedAvg \+ SecAgg .*secure_vs_plain_max_abs_diff=([0-9.e+-]+)", table)
    assert diff is not None and float(diff.group(1)) < 1e-5
    # every DP row's ledger stays within its epsilon
    for eps in (8, 4, 1):
        line = next(ln for ln in table.splitlines() if f"DP-SGD + SecAgg, eps={eps} " in ln)
        gated = re.search(r"ledger eps \(rdp, gated\)=\{([^}]*)\}", line).group(1)
        assert all(0 < float(v) <= eps + 1e-9 for v in re.findall(r": ([0-9.]+)", gated))
    assert "Data check against the injected defects" in table
    assert (tmp_path / "head" / "utility.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # LoRA through both towers (the federation's default trainable set), noisy data only
    table = _run(work, tmp_path / "adapter", "--scope", "adapter", "--only", "eps=8",
                 "--variants", "noisy", "--log-rounds")
    rows = _rows(table)
    assert list(rows) == ["DP-SGD + SecAgg, eps=8"]
    noisy, clean = rows["DP-SGD + SecAgg, eps=8"]
    assert 0.0 <= float(noisy) <= 1.0 and clean == "-"
    assert "trainable set `adapter`" in table
