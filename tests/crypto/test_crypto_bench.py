"""bench/keystream.py runs and reports consistent figures (smoke test of `make bench`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "keystream.py"


def test_keystream_bench_quick_json() -> None:
    result = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--no-ckks", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(result.stdout)
    for key in (
        "memcpy_gb_s",
        "aes256_ctr_gb_s",
        "chacha20_gb_s",
        "apply_masks_ms_1w",
        "apply_masks_ms_2w",
        "encode_1e6_f32_ms",
    ):
        assert figures[key] > 0, key
    assert (
        abs(figures["aes_over_chacha"] * figures["chacha20_gb_s"] - figures["aes256_ctr_gb_s"])
        < 1e-9
    )
    assert (
        abs(
            figures["apply_masks_speedup_2w"] * figures["apply_masks_ms_2w"]
            - figures["apply_masks_ms_1w"]
        )
        < 1e-9
    )
    # 10 masks of 1e6 uint64 words = 80 MB of keystream per call.
    assert abs(figures["apply_masks_gb_s_1w"] * figures["apply_masks_ms_1w"] / 1e3 - 0.08) < 1e-9
