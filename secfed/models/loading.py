"""Load Hugging Face towers and tokenizers from local directories only; never download.

Weights are read from safetensors only (``use_safetensors=True``): a ``pytorch_model.bin`` would
go through ``torch.load``, i.e. pickle. Remote code is never trusted.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from secfed.errors import ModelError

__all__ = ["load_tokenizer", "load_tower", "resolve_model_dir"]

# "org/name" or "name": what from_pretrained would take for a hub repository id.
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*(/[A-Za-z0-9][A-Za-z0-9_.\-]*)?")


def resolve_model_dir(path: str | os.PathLike[str], *, field: str = "model_dir") -> Path:
    """Check that ``path`` is an existing local Hugging Face model directory.

    Raises:
        ModelError: the path looks like a hub id, does not exist, is not a directory or holds
            no ``config.json``.
    """
    if not isinstance(path, str | os.PathLike):
        raise ModelError(f"{field} must be a local directory path (got {type(path).__name__})")
    p = Path(path)
    if not p.exists():
        if isinstance(path, str) and _HUB_ID.fullmatch(path):
            raise ModelError(
                f"{field} must be a local directory; {path!r} does not exist and looks like a "
                "Hugging Face hub id (secfed never downloads models)"
            )
        raise ModelError(f"{field} must be an existing local directory (got {str(p)!r})")
    if not p.is_dir():
        raise ModelError(f"{field} must be a directory (got file {str(p)!r})")
    if not (p / "config.json").is_file():
        raise ModelError(f"{field} must contain a Hugging Face config.json (missing in {str(p)!r})")
    return p.resolve()


def load_tower(path: str | os.PathLike[str]) -> Any:
    """``AutoModel.from_pretrained`` on a local directory (safetensors only, offline).

    Raises:
        ModelError: the directory is unusable or holds no safetensors weights.
    """
    from transformers import AutoModel

    model_dir = resolve_model_dir(path)
    if not any(model_dir.glob("*.safetensors")):
        raise ModelError(
            f"model directory {str(model_dir)!r} must hold safetensors weights "
            "(pickle-based .bin checkpoints are refused)"
        )
    try:
        return AutoModel.from_pretrained(
            str(model_dir), local_files_only=True, use_safetensors=True, trust_remote_code=False
        )
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"cannot load model from {str(model_dir)!r}: {exc}") from None


def load_tokenizer(path: str | os.PathLike[str]) -> Any | None:
    """The tokenizer stored in a local model directory, or ``None`` if it holds none.

    Raises:
        ModelError: the directory is unusable or its tokenizer files are broken.
    """
    from transformers import AutoTokenizer

    model_dir = resolve_model_dir(path)
    names = ("tokenizer.json", "vocab.txt", "tokenizer_config.json")
    if not any((model_dir / n).is_file() for n in names):
        return None
    try:
        return AutoTokenizer.from_pretrained(
            str(model_dir), local_files_only=True, trust_remote_code=False
        )
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"cannot load tokenizer from {str(model_dir)!r}: {exc}") from None
