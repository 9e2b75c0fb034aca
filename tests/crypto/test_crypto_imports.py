"""secfed.crypto is the pure layer: no module of it may pull in torch (or any network stack)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

CRYPTO_DIR = Path(__file__).resolve().parents[2] / "crypto"
MODULES = sorted(
    "secfed.crypto" if p.stem == "__init__" else f"secfed.crypto.{p.stem}"
    for p in CRYPTO_DIR.glob("*.py")
)
# The stdlib ``socket`` module is not listed: tenseal imports multiprocessing, which imports it
# without opening anything. tools/check_layers.py forbids importing it from our own code.
FORBIDDEN = ("torch", "transformers", "opacus", "peft", "httpx", "fastapi", "uvicorn", "requests")


def test_every_crypto_module_is_listed() -> None:
    assert {"secfed.crypto.ckks", "secfed.crypto.prg", "secfed.crypto.keys"} <= set(MODULES)


@pytest.mark.parametrize("module", MODULES)
def test_module_imports_no_heavy_or_network_package(module: str) -> None:
    code = (
        f"import sys, {module}\n"
        f"bad = sorted(m for m in {FORBIDDEN!r} if m in sys.modules)\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
