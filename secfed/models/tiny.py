"""Tiny randomly initialised towers written as local Hugging Face directories.

For tests, benchmarks and smoke runs: a BERT-like text tower (with a small WordPiece tokenizer)
and a ViT-like image tower, hidden size 32 and 2 layers by default. Built from ``transformers``
configs only, nothing is downloaded.
"""

from __future__ import annotations

import os
import string
from pathlib import Path

import torch

__all__ = ["write_tiny_image_tower", "write_tiny_text_tower"]

_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_WORDS = [
    "pothole", "crack", "graffiti", "flood", "light", "broken", "road", "street", "sign",
    "bench", "tree", "fallen", "water", "leak", "trash", "overflowing", "near", "the", "a",
    "on", "at", "is", "and", "park", "bridge", "sidewalk", "damaged", "missing", "dark",
]


def write_tiny_text_tower(
    out_dir: str | os.PathLike[str], *, hidden_size: int = 32, num_layers: int = 2,
    num_heads: int = 2, max_length: int = 32, dropout: float = 0.0, seed: int = 0,
) -> Path:
    """Write a tiny ``BertModel`` plus a WordPiece tokenizer to ``out_dir``; returns it."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = _SPECIAL + list(string.ascii_lowercase) + [f"##{c}" for c in string.ascii_lowercase]
    vocab += _WORDS
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(out / "vocab.txt"), do_lower_case=True)
    tokenizer.model_max_length = max_length
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, intermediate_size=2 * hidden_size,
        max_position_embeddings=max_length, hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertModel(config, add_pooling_layer=False)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


def write_tiny_image_tower(
    out_dir: str | os.PathLike[str], *, hidden_size: int = 32, num_layers: int = 2,
    num_heads: int = 2, image_size: int = 16, patch_size: int = 8, dropout: float = 0.0,
    seed: int = 0,
) -> Path:
    """Write a tiny ``ViTModel`` to ``out_dir``; returns it."""
    from transformers import ViTConfig, ViTModel

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = ViTConfig(
        image_size=image_size, patch_size=patch_size, hidden_size=hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads,
        intermediate_size=2 * hidden_size, hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ViTModel(config, add_pooling_layer=False)
    model.save_pretrained(str(out))
    return out
