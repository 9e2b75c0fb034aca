"""Load the JSON test vectors in ``tests/crypto/vectors/`` (each file names its origin)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

VECTORS = Path(__file__).resolve().parent / "vectors"


def load_vectors(name: str) -> Any:
    """The parsed vector file ``name``; every file carries a non-empty ``source`` note."""
    content = json.loads((VECTORS / name).read_text())
    assert content["source"], f"{name} must say where its vectors come from"
    return content
