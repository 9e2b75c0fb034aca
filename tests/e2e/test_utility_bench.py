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


def _generative_rows(table: str) -> dict[str, list[str]]:
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.split("|")[1:-1]]
        if len(cells) == 8 and cells[0] not in ("row", "---"):
            rows[cells[0]] = cells[1:]
    return rows


@pytest.mark.slow
@pytest.mark.parametrize("vision", [False, True], ids=["text", "vision-language"])
def test_generative_utility_table_on_the_tiny_scale(tmp_path, vision) -> None:
    out = tmp_path / "generative.md"
    cmd = [sys.executable, str(ROOT / "bench" / "utility.py"), "--task", "generative",
           "--scale", "tiny", "--size", "tiny", "--rounds", "2", "--epochs", "1",
           "--epsilons", "8", "--work", str(tmp_path / "work"), "--out", str(out),
           *(["--vision"] if vision else [])]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    table = out.read_text()
    rows = _generative_rows(table)
    assert set(rows) == {"base (pre-trained, no fine-tuning)", "centralized (non-private)",
                         *(f"local-only {n}" for n in ("city_operations", "energy_utility",
                                                       "residential_security")),
                         "federated DP + SecAgg eps=8"}
    for fields, hazard, priority, action, exact, perplexity, _ in rows.values():
        assert all(0.0 <= float(v) <= 1.0 for v in (fields, hazard, priority, action, exact))
        assert 1.0 <= float(perplexity) < 1e4
    # fine-tuning lowers the held-out perplexity of the answers below the base model's
    base = float(rows["base (pre-trained, no fine-tuning)"][5])
    assert float(rows["centralized (non-private)"][5]) < base
    # the DP row's ledgers stay within epsilon, from the accountant
    gated = re.search(r"ledger eps \(rdp\) \{([^}]*)\}", rows["federated DP + SecAgg eps=8"][6])
    assert gated is not None
    assert all(0 < float(v) <= 8 + 1e-9 for v in re.findall(r": ([0-9.]+)", gated.group(1)))
    variant = re.search(r"^- variant: (.*)$", table, re.M)
    assert variant is not None
    assert variant.group(1).startswith("vision-language" if vision else "text")
    if vision:  # the frames went through the model: tiny frames are 9 image tokens
        assert "9 image tokens" in variant.group(1)
