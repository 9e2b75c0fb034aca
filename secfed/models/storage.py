"""Build, save and load secfed classifiers: a directory with ``secfed_model.json``, the Hugging
Face tower directories (base weights, tokenizer) and ``adapter.safetensors`` (LoRA + head).

No pickle: towers are written with ``save_pretrained`` (safetensors) and read back with
``use_safetensors=True``; the adapter is a safetensors file whose hash is recorded in the JSON
and re-checked on load.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from secfed.errors import ModelError
from secfed.models.adapter import AdapterLayout, adapter_hash, adapter_layout, get_flat
from secfed.models.classifiers import ClassifierSpec, build_from_towers
from secfed.models.loading import load_tokenizer, load_tower, resolve_model_dir
from secfed.models.lora import LoraSettings, attach_lora

__all__ = [
    "MODEL_FORMAT",
    "ProcessorInfo",
    "build_classifier",
    "classifier_from_towers",
    "load_classifier",
    "save_classifier",
]

MODEL_FORMAT = "secfed-model/v1"
META_FILE = "secfed_model.json"
ADAPTER_FILE = "adapter.safetensors"
TOWER_DIRS = {"text": "text_tower", "image": "image_tower"}
DEFAULT_MAX_TEXT_LENGTH = 64


@dataclass(frozen=True)
class ProcessorInfo:
    """How to turn records into model inputs, and what the model was built from."""

    kind: str
    num_classes: int
    labels: tuple[str, ...] | None
    max_text_length: int | None
    image_size: int | None
    lora: LoraSettings
    spec: ClassifierSpec
    tokenizer: Any = field(default=None, compare=False, repr=False)


def _image_size(tower: nn.Module | None) -> int | None:
    if tower is None:
        return None
    size = getattr(tower.config, "image_size", None)
    if isinstance(size, list | tuple):
        size = size[0]
    return int(size) if size is not None else None


def classifier_from_towers(
    spec: ClassifierSpec,
    *,
    lora: LoraSettings,
    text_tower: nn.Module | None = None,
    image_tower: nn.Module | None = None,
    tokenizer: Any = None,
    labels: tuple[str, ...] | list[str] | None = None,
    max_text_length: int | None = None,
    seed: int | None = None,
) -> nn.Module:
    """Assemble a classifier over in-memory towers and attach LoRA (towers frozen, head trainable).

    ``seed`` fixes the head's initial weights (public model initialisation, not a secret).

    Raises:
        ModelError: inconsistent towers/labels, or LoRA targets that are not Linear.
    """
    if labels is not None:
        labels = tuple(labels)
        if len(labels) != spec.num_classes or len(set(labels)) != len(labels):
            raise ModelError(
                f"labels must be {spec.num_classes} distinct names (got {len(labels)})"
            )
    if text_tower is not None and max_text_length is None:
        limit = getattr(text_tower.config, "max_position_embeddings", DEFAULT_MAX_TEXT_LENGTH)
        max_text_length = min(DEFAULT_MAX_TEXT_LENGTH, int(limit))
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        model = build_from_towers(spec, text_tower=text_tower, image_tower=image_tower)
        model = attach_lora(model, lora, trainable_modules=type(model).head_modules)
    model.processor_info = ProcessorInfo(
        kind=spec.kind,
        num_classes=spec.num_classes,
        labels=labels,
        max_text_length=max_text_length if text_tower is not None else None,
        image_size=_image_size(image_tower),
        lora=lora,
        spec=spec,
        tokenizer=tokenizer,
    )
    return model


def build_classifier(
    *,
    kind: str,
    num_classes: int,
    text_model_dir: str | os.PathLike[str] | None = None,
    image_model_dir: str | os.PathLike[str] | None = None,
    lora: LoraSettings | None = None,
    labels: tuple[str, ...] | list[str] | None = None,
    max_text_length: int | None = None,
    text_pooling: str = "mean",
    image_pooling: str = "cls",
    fusion_dim: int = 64,
    seed: int | None = None,
) -> nn.Module:
    """Load towers from local Hugging Face directories and build a LoRA classifier.

    Raises:
        ModelError: a directory is not local/usable, or the kind and towers disagree.
    """
    spec = ClassifierSpec(
        kind=kind, num_classes=num_classes, text_pooling=text_pooling,
        image_pooling=image_pooling, fusion_dim=fusion_dim,
    )
    text_tower = load_tower(text_model_dir) if text_model_dir is not None else None
    image_tower = load_tower(image_model_dir) if image_model_dir is not None else None
    tokenizer = load_tokenizer(text_model_dir) if text_model_dir is not None else None
    return classifier_from_towers(
        spec, lora=lora or LoraSettings(), text_tower=text_tower, image_tower=image_tower,
        tokenizer=tokenizer, labels=labels, max_text_length=max_text_length, seed=seed,
    )


def _base_state_dict(tower: nn.Module) -> dict[str, torch.Tensor]:
    """The tower's weights with the LoRA wrappers stripped (``x.base_layer.w`` -> ``x.w``)."""
    clean = {}
    for name, tensor in tower.state_dict().items():
        if ".lora_" in name:
            continue
        clean[name.replace(".base_layer.", ".")] = tensor.detach().clone().contiguous()
    return clean


def _info_of(model: nn.Module) -> ProcessorInfo:
    info = getattr(model, "processor_info", None)
    if not isinstance(info, ProcessorInfo):
        raise ModelError(
            "model must come from build_classifier/load_classifier (no processor_info found)"
        )
    return info


def write_adapter_file(model: nn.Module, out: Path) -> tuple[AdapterLayout, np.ndarray]:
    """Write ``model``'s trainable (adapter) parameters to ``out/ADAPTER_FILE`` (float32
    safetensors); returns their layout and flat vector."""
    from safetensors.torch import save_file

    layout = adapter_layout(model)
    vec = get_flat(model, layout)
    params = dict(model.named_parameters())
    tensors = {e.name: params[e.name].detach().to(torch.float32).contiguous().clone()
               for e in layout.entries}
    save_file(tensors, str(out / ADAPTER_FILE), metadata={"format": MODEL_FORMAT})
    return layout, vec


def save_classifier(
    model: nn.Module, model_dir: str | os.PathLike[str], *, overwrite: bool = False
) -> Path:
    """Write the classifier to ``model_dir`` (created); returns the directory.

    Raises:
        ModelError: the directory is not empty (without ``overwrite``) or the model was not
            built by this module.
    """

    info = _info_of(model)
    out = Path(model_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ModelError(f"model_dir must be empty or new (got non-empty {str(out)!r})")
    out.mkdir(parents=True, exist_ok=True)
    towers = model.towers()
    for role, tower in towers.items():
        tower_dir = out / TOWER_DIRS[role]
        tower.save_pretrained(str(tower_dir), state_dict=_base_state_dict(tower))
        if role == "text" and info.tokenizer is not None:
            info.tokenizer.save_pretrained(str(tower_dir))
    layout, vec = write_adapter_file(model, out)
    meta = {
        "format": MODEL_FORMAT,
        "kind": info.kind,
        "num_classes": info.num_classes,
        "labels": list(info.labels) if info.labels is not None else None,
        "towers": {role: TOWER_DIRS[role] for role in sorted(towers)},
        "lora": info.lora.to_dict(),
        "spec": {
            "text_pooling": info.spec.text_pooling,
            "image_pooling": info.spec.image_pooling,
            "fusion_dim": info.spec.fusion_dim,
            "normalize_inputs": info.spec.normalize_inputs,
        },
        "image_size": info.image_size,
        "max_text_length": info.max_text_length,
        "adapter": {
            "file": ADAPTER_FILE,
            "layout": json.loads(layout.to_json()),
            "hash": adapter_hash(layout, vec),
        },
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return out


def read_meta_file(model_dir: Path) -> dict[str, Any]:
    """The JSON object of ``model_dir``'s :data:`META_FILE`, of format :data:`MODEL_FORMAT`.

    Raises:
        ModelError: the file is missing, not JSON, or of another format.
    """
    path = model_dir / META_FILE
    if not path.is_file():
        raise ModelError(f"model_dir must contain {META_FILE} (missing in {str(model_dir)!r})")
    try:
        meta = json.loads(path.read_text())
    except ValueError as exc:
        raise ModelError(f"{META_FILE} is not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != MODEL_FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else None
        raise ModelError(f"{META_FILE} format must be {MODEL_FORMAT!r} (got {got!r})")
    return meta


def _read_meta(model_dir: Path) -> dict[str, Any]:
    meta = read_meta_file(model_dir)
    towers = meta.get("towers")
    if not isinstance(towers, dict) or any(
        role not in TOWER_DIRS or sub != TOWER_DIRS[role] for role, sub in towers.items()
    ):
        raise ModelError(f"{META_FILE} field 'towers' must map text/image to {TOWER_DIRS}")
    return meta


def load_classifier(model_dir: str | os.PathLike[str]) -> tuple[nn.Module, ProcessorInfo]:
    """Load a classifier written by :func:`save_classifier`.

    Returns the model (LoRA attached, towers frozen, adapter restored) and its
    :class:`ProcessorInfo` (tokenizer, image size, max text length, labels).

    Raises:
        ModelError: missing or malformed files, or an adapter whose hash differs from the one
            recorded in ``secfed_model.json``.
    """
    from secfed.models.adapter import AdapterLayout

    if not isinstance(model_dir, str | os.PathLike):
        raise ModelError(f"model_dir must be a path (got {type(model_dir).__name__})")
    root = Path(model_dir)
    if not root.is_dir():
        resolve_model_dir(model_dir)  # raises with the hub-id / missing-directory message
    meta = _read_meta(root)
    try:
        spec = ClassifierSpec(kind=meta["kind"], num_classes=meta["num_classes"],
                              **meta.get("spec", {}))
        lora = LoraSettings.from_dict(meta["lora"])
        recorded = meta["adapter"]
        layout = AdapterLayout.from_json(json.dumps(recorded["layout"]))
    except (KeyError, TypeError) as exc:
        raise ModelError(f"{META_FILE} is missing or has a malformed field ({exc})") from None
    towers = {role: load_tower(root / sub) for role, sub in meta["towers"].items()}
    tokenizer = load_tokenizer(root / TOWER_DIRS["text"]) if "text" in towers else None
    model = classifier_from_towers(
        spec, lora=lora, text_tower=towers.get("text"), image_tower=towers.get("image"),
        tokenizer=tokenizer, labels=meta.get("labels"),
        max_text_length=meta.get("max_text_length"),
    )
    restore_adapter(model, root, layout, recorded.get("hash"), rebuilt_from="the towers")
    return model, model.processor_info


def restore_adapter(model: nn.Module, root: Path, layout: Any, recorded_hash: Any, *,
                    rebuilt_from: str) -> None:
    """Load ``adapter.safetensors`` from ``root`` into ``model`` and check it against the layout
    and adapter hash recorded in ``secfed_model.json`` (shared by every model kind).

    Raises:
        ModelError: the rebuilt model's layout, the file's tensor names or shapes, or the loaded
            adapter's hash differ from what was recorded; the file cannot be read.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if adapter_layout(model) != layout:
        raise ModelError(f"adapter layout rebuilt from {rebuilt_from} differs from the recorded one")
    try:
        tensors = load_file(str(root / ADAPTER_FILE))
    except (OSError, SafetensorError) as exc:
        raise ModelError(f"cannot read {ADAPTER_FILE} ({exc})") from None
    if sorted(tensors) != list(layout.names):
        raise ModelError(f"{ADAPTER_FILE} tensor names must equal the adapter layout's")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for e in layout.entries:
            if tuple(tensors[e.name].shape) != e.shape:
                raise ModelError(f"{ADAPTER_FILE}: {e.name!r} must have shape {e.shape}")
            params[e.name].copy_(tensors[e.name])
    got = adapter_hash(layout, get_flat(model, layout))
    if got != recorded_hash:
        raise ModelError(f"{ADAPTER_FILE} hash must equal the recorded adapter hash (got {got})")
