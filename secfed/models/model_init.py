"""``secfed model init``: turn a local Hugging Face checkpoint into a secfed model directory, and
:func:`load_model`, which reads any secfed model directory back.

Tasks: ``causal-lm`` and ``vision-language`` (a :class:`~secfed.models.generative.CausalLM`
over the checkpoint, LoRA on the language model), ``seq-cls``, ``image-cls`` and
``image-text-cls`` (the text / image / fusion classifiers of :mod:`secfed.models.classifiers`
over the user's towers, LoRA plus a head). The directory holds ``secfed_model.json``, the base
weights (safetensors, written by ``save_pretrained``), the tokenizer and ``adapter.safetensors``
(the initial adapter; its hash is the federation's initial global hash).

Only local directories and safetensors weights are read: a hub id, a directory without
``config.json`` or one holding only pickle-based ``.bin`` / ``.pt`` weights is refused before
anything is loaded; remote code is never trusted.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from secfed.errors import ModelError
from secfed.models.adapter import AdapterLayout, adapter_hash, adapter_layout
from secfed.models.classifiers import ClassifierSpec, build_from_towers
from secfed.models.generative import GENERATIVE_TASKS, CausalLM, GenerativeInfo
from secfed.models.loading import load_tokenizer, load_tower, resolve_model_dir
from secfed.models.lora import LoraSettings, attach_lora
from secfed.models.storage import (
    ADAPTER_FILE,
    META_FILE,
    MODEL_FORMAT,
    classifier_from_towers,
    load_classifier,
    read_meta_file,
    restore_adapter,
    save_classifier,
    write_adapter_file,
)
from secfed.models.targets import auto_lora_targets, named_lora_targets

__all__ = [
    "CLASSIFIER_TASKS",
    "LM_DIR",
    "TASKS",
    "InitReport",
    "init_model",
    "load_generative",
    "load_model",
    "read_model_meta",
    "task_of",
]

TASKS = ("causal-lm", "seq-cls", "image-cls", "image-text-cls", "vision-language")
#: classification task -> the classifier kind of :mod:`secfed.models.classifiers`
CLASSIFIER_TASKS = {"seq-cls": "text", "image-cls": "image", "image-text-cls": "fusion"}
LM_DIR = "lm"
DEFAULT_MAX_LENGTH = 256
_PREPROCESSOR = "preprocessor_config.json"

Log = Callable[[str], None]


@dataclass(frozen=True)
class InitReport:
    """What :func:`init_model` wrote."""

    out: Path
    task: str
    targets: tuple[str, ...]
    target_regex: str
    adapter_size: int


def _quiet(_: str) -> None:
    return None


def _require_safetensors(path: str | os.PathLike[str], *, field: str) -> Path:
    model_dir = resolve_model_dir(path, field=field)
    if not any(model_dir.glob("*.safetensors")):
        pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        raise ModelError(
            f"{field} {str(model_dir)!r} must hold safetensors weights (found "
            f"{pickles[:2] or 'none'}; pickle-based checkpoints are refused: convert them with "
            "save_pretrained(safe_serialization=True) where you trust them)"
        )
    return model_dir


def _load_lm(model_dir: Path, task: str) -> nn.Module:
    """The HF model of a generative task, float32, from a local safetensors directory."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    auto = AutoModelForCausalLM if task == "causal-lm" else AutoModelForImageTextToText
    try:
        return auto.from_pretrained(  # nosec B615  # local directory only (local_files_only=True)
            str(model_dir), local_files_only=True, use_safetensors=True,
            trust_remote_code=False, dtype=torch.float32,
        )
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"cannot load a {task} model from {str(model_dir)!r}: "
                         f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


def _choose_targets(model: nn.Module, lora_targets: str, *, vision: bool, language: bool = True
                    ) -> tuple[str, list[str]]:
    if not isinstance(lora_targets, str) or not lora_targets.strip():
        raise ModelError(f"lora targets must be 'auto' or NAME,... (got {lora_targets!r})")
    if lora_targets.strip() == "auto":
        return auto_lora_targets(model, vision=vision, language=language)
    return named_lora_targets(model, lora_targets.split(","), vision=vision, language=language)


def _image_preprocessing(model_dir: Path, lm: nn.Module) -> dict[str, Any]:
    """Image size, mean/std (from ``preprocessor_config.json`` if present) and the number of
    image placeholder tokens one image expands to (measured with a blank image)."""
    config = lm.config
    vision = getattr(config, "vision_config", None)
    size = getattr(vision, "image_size", None)
    token_id = getattr(config, "image_token_id", None)
    if not isinstance(size, int) or not isinstance(token_id, int):
        raise ModelError("a vision-language checkpoint must have vision_config.image_size and "
                         "image_token_id in its config (a LLaVA-style model)")
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    pre = model_dir / _PREPROCESSOR
    if pre.is_file():
        try:
            raw = json.loads(pre.read_text())
            mean = tuple(float(v) for v in raw.get("image_mean", mean))  # type: ignore[assignment]
            std = tuple(float(v) for v in raw.get("image_std", std))  # type: ignore[assignment]
        except (ValueError, TypeError) as exc:
            raise ModelError(f"{pre}: image_mean/image_std must be 3 numbers ({exc})") from None
    with torch.no_grad():
        out = lm.model.get_image_features(pixel_values=torch.zeros(1, 3, size, size))
    feats = getattr(out, "pooler_output", out)
    first = feats[0] if isinstance(feats, list | tuple) else feats[0]
    return {"image_size": size, "image_tokens": int(first.shape[-2]), "image_token_id": token_id,
            "image_mean": list(mean), "image_std": list(std)}


def _settings(lora_r: int, lora_alpha: float, regex: str) -> LoraSettings:
    from secfed.errors import ConfigError

    try:
        return LoraSettings(rank=lora_r, alpha=float(lora_alpha), target_modules=regex)
    except ConfigError as exc:
        raise ModelError(str(exc)) from None


def _init_generative(base: Path, *, task: str, out: Path, lora_r: int, lora_alpha: float,
                     lora_targets: str, max_length: int, lora_vision: bool, seed: int,
                     log: Log) -> InitReport:
    log(f"loading {task} checkpoint {base}")
    lm = _load_lm(base, task)
    tokenizer = load_tokenizer(base)
    if tokenizer is None:
        raise ModelError(f"base {str(base)!r} must hold its tokenizer (tokenizer.json or "
                         "tokenizer_config.json)")
    extra = _image_preprocessing(base, lm) if task == "vision-language" else {}
    model = CausalLM(lm, task)
    regex, targets = _choose_targets(model, lora_targets, vision=lora_vision)
    lora = _settings(lora_r, lora_alpha, regex)
    log(f"writing the base weights and tokenizer to {out / LM_DIR}")
    lm.save_pretrained(str(out / LM_DIR))  # before LoRA: the base exactly as loaded
    tokenizer.save_pretrained(str(out / LM_DIR))
    if (base / _PREPROCESSOR).is_file():
        shutil.copyfile(base / _PREPROCESSOR, out / LM_DIR / _PREPROCESSOR)
    log(f"LoRA r={lora.rank} alpha={lora.alpha:g} on {len(targets)} modules: "
        f"{_summary(targets)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the LoRA A init: public, fixed so re-running gives one hash
        model = attach_lora(model, lora)
    meta = {
        "format": MODEL_FORMAT, "kind": task, "task": task, "towers": {"lm": LM_DIR},
        "lora": lora.to_dict(), "targets": targets, "max_text_length": max_length,
        "architecture": str(getattr(lm.config, "model_type", type(lm).__name__)),
        "chat_template": bool(getattr(tokenizer, "chat_template", None)), **extra,
    }
    layout = _write_adapter(model, out, meta)
    return InitReport(out, task, tuple(targets), regex, layout.total)


def _summary(targets: list[str]) -> str:
    leaves = sorted({t.rsplit(".", 1)[-1] for t in targets})
    return f"{', '.join(leaves)} (e.g. {targets[0]})"


def _write_adapter(model: nn.Module, out: Path, meta: dict[str, Any]) -> AdapterLayout:
    layout, vec = write_adapter_file(model, out)
    meta = {**meta, "adapter": {"file": ADAPTER_FILE, "layout": json.loads(layout.to_json()),
                                "hash": adapter_hash(layout, vec)}}
    (out / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return layout


def _init_classifier(base: Path, *, task: str, out: Path, base_image: Path | None,
                     lora_r: int, lora_alpha: float, lora_targets: str, labels: list[str],
                     max_length: int | None, seed: int, log: Log) -> InitReport:
    kind = CLASSIFIER_TASKS[task]
    text_dir = base if kind in ("text", "fusion") else None
    image_dir = base_image if kind == "fusion" else (base if kind == "image" else None)
    if kind == "fusion" and image_dir is None:
        raise ModelError("task image-text-cls needs --base-image DIR (the image tower)")
    towers = {}
    for role, d in (("text", text_dir), ("image", image_dir)):
        if d is not None:
            log(f"loading the {role} tower {d}")
            towers[role] = load_tower(d)
    tokenizer = load_tokenizer(text_dir) if text_dir is not None else None
    if text_dir is not None and tokenizer is None:
        raise ModelError(f"base {str(text_dir)!r} must hold its tokenizer")
    spec = ClassifierSpec(kind=kind, num_classes=len(labels))
    bare = build_from_towers(spec, text_tower=towers.get("text"), image_tower=towers.get("image"))
    regex, targets = _choose_targets(bare, lora_targets, vision=True)
    lora = _settings(lora_r, lora_alpha, regex)
    log(f"LoRA r={lora.rank} alpha={lora.alpha:g} on {len(targets)} modules: "
        f"{_summary(targets)}")
    model = classifier_from_towers(
        spec, lora=lora, text_tower=towers.get("text"), image_tower=towers.get("image"),
        tokenizer=tokenizer, labels=labels, max_text_length=max_length, seed=seed,
    )
    log(f"writing the model directory {out}")
    save_classifier(model, out, overwrite=True)
    return InitReport(out, task, tuple(targets), regex, adapter_layout(model).total)


def _check_request(task: str, out: Path, labels: list[str] | None, base_image: Any,
                   max_length: int | None) -> None:
    if task not in TASKS:
        raise ModelError(f"task must be one of {TASKS} (got {task!r})")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ModelError(f"out must be a new or empty directory (got non-empty {str(out)!r})")
    if task in CLASSIFIER_TASKS:
        if not labels or len(labels) < 2 or len(set(labels)) != len(labels):
            raise ModelError(f"task {task} needs --labels A,B,... : at least 2 distinct class "
                             f"names (got {labels!r})")
    elif labels:
        raise ModelError(f"task {task} takes no --labels (got {labels!r})")
    if base_image is not None and task != "image-text-cls":
        raise ModelError(f"--base-image is for task image-text-cls only (got task {task})")
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)
                                   or max_length < 2):
        raise ModelError(f"max length must be an integer >= 2 (got {max_length!r})")


def init_model(
    base: str | os.PathLike[str], *, task: str, out: str | os.PathLike[str],
    base_image: str | os.PathLike[str] | None = None, lora_r: int = 8, lora_alpha: float = 16.0,
    lora_targets: str = "auto", labels: list[str] | tuple[str, ...] | None = None,
    max_length: int | None = None, lora_vision: bool = False, seed: int = 0,
    log: Log | None = None,
) -> InitReport:
    """Build a secfed model directory at ``out`` from the local checkpoint ``base``.

    Args:
        base: a local Hugging Face checkpoint directory (safetensors).
        task: one of :data:`TASKS`.
        out: a new or empty directory.
        base_image: the image tower of ``image-text-cls``.
        lora_r, lora_alpha: LoRA rank and scaling numerator.
        lora_targets: ``"auto"`` (attention query/value projections) or ``"NAME,..."``
            (module leaf names).
        labels: the class names of a classification task.
        max_length: token limit of one record (generative default 256; classifiers the
            tower's, at most 64).
        lora_vision: vision-language: adapt the vision tower too.
        seed: fixes the LoRA / head initialisation (public, not a secret).
        log: called with one line per step (loading, LoRA targets, writing).

    Raises:
        ModelError: unknown task, a hub id or non-local path, pickle-only weights, bad LoRA
            targets or settings, missing labels, a non-empty ``out``.
    """
    log = log or _quiet
    out_dir = Path(out)
    labels = [str(x) for x in labels] if labels else None
    _check_request(task, out_dir, labels, base_image, max_length)
    base_dir = _require_safetensors(base, field="base")
    image_dir = (_require_safetensors(base_image, field="base_image")
                 if base_image is not None else None)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        if task in GENERATIVE_TASKS:
            return _init_generative(base_dir, task=task, out=out_dir, lora_r=lora_r,
                                    lora_alpha=lora_alpha, lora_targets=lora_targets,
                                    max_length=max_length or DEFAULT_MAX_LENGTH,
                                    lora_vision=lora_vision, seed=seed, log=log)
        return _init_classifier(base_dir, task=task, out=out_dir, base_image=image_dir,
                                lora_r=lora_r, lora_alpha=lora_alpha, lora_targets=lora_targets,
                                labels=labels or [], max_length=max_length, seed=seed, log=log)
    except BaseException:
        shutil.rmtree(out_dir, ignore_errors=True)  # never leave half a model directory
        raise


# ----------------------------------------------------------------------------- loading


def read_model_meta(model_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """``secfed_model.json`` of any secfed model directory (format checked, no weights loaded).

    Raises:
        ModelError: missing, not JSON, or another format.
    """
    return read_meta_file(Path(model_dir))


def task_of(model_dir: str | os.PathLike[str]) -> str:
    """The task of a secfed model directory (read from its JSON, no weights loaded).

    Raises:
        ModelError: not a secfed model directory.
    """
    meta = read_meta_file(Path(model_dir))
    kind = meta.get("task", meta.get("kind"))
    by_kind = {v: k for k, v in CLASSIFIER_TASKS.items()}
    task = by_kind.get(kind, kind)
    if task not in TASKS:
        raise ModelError(f"{META_FILE} field 'kind' must name one of {TASKS} (got {kind!r})")
    return str(task)


def _restore_adapter(model: nn.Module, root: Path, recorded: dict[str, Any]) -> None:
    layout = AdapterLayout.from_json(json.dumps(recorded["layout"]))
    restore_adapter(model, root, layout, recorded.get("hash"), rebuilt_from="the base model")


def load_generative(model_dir: str | os.PathLike[str]) -> tuple[CausalLM, GenerativeInfo]:
    """Load a ``causal-lm`` / ``vision-language`` directory written by :func:`init_model`.

    Raises:
        ModelError: missing or malformed files, or an adapter whose hash differs from the
            recorded one.
    """
    root = Path(model_dir)
    meta = read_meta_file(root)
    try:
        task = meta["task"]
        lora = LoraSettings.from_dict(meta["lora"])
        recorded = meta["adapter"]
        image = {k: meta.get(k) for k in ("image_size", "image_tokens", "image_token_id")}
        info = GenerativeInfo(
            task=task, max_length=int(meta["max_text_length"]), lora=lora,
            targets=tuple(meta.get("targets", ())), architecture=str(meta.get("architecture")),
            image_mean=tuple(meta["image_mean"]) if meta.get("image_mean") else None,
            image_std=tuple(meta["image_std"]) if meta.get("image_std") else None, **image,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"{META_FILE} is missing or has a malformed field ({exc})") from None
    if task not in GENERATIVE_TASKS or meta.get("towers") != {"lm": LM_DIR}:
        raise ModelError(f"{META_FILE}: a generative model must have task in {GENERATIVE_TASKS} "
                         f"and towers {{'lm': {LM_DIR!r}}}")
    lm_dir = _require_safetensors(root / LM_DIR, field="model_dir lm")
    model = attach_lora(CausalLM(_load_lm(lm_dir, task), task), lora)
    _restore_adapter(model, root, recorded)
    tokenizer = load_tokenizer(lm_dir)
    info = GenerativeInfo(**{**info.__dict__, "tokenizer": tokenizer})
    model.processor_info = info
    return model, info


def load_model(model_dir: str | os.PathLike[str]) -> tuple[nn.Module, Any]:
    """Load any secfed model directory: a classifier (:func:`load_classifier`) or a generative
    model (:func:`load_generative`). Returns ``(model, info)``; ``task_of(model_dir)`` names it.

    Raises:
        ModelError: not a usable secfed model directory.
    """
    if not isinstance(model_dir, str | os.PathLike):
        raise ModelError(f"model_dir must be a path (got {type(model_dir).__name__})")
    if not Path(model_dir).is_dir():
        resolve_model_dir(model_dir)  # raises with the hub-id / missing-directory message
    if task_of(model_dir) in GENERATIVE_TASKS:
        return load_generative(model_dir)
    return load_classifier(model_dir)
