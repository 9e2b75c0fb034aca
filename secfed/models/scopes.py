"""Trainable sets of a fusion classifier: which parameters a site trains and aggregates."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from torch import nn

from secfed import names
from secfed.errors import ModelError
from secfed.models.classifiers import FusionClassifier

__all__ = ["TRAINABLE_SCOPES", "select_trainable", "load_for_scope"]

#: What training updates (and the federation aggregates), largest first:
#: ``"adapter"`` LoRA on both towers + the fusion head (as built; the default);
#: ``"top"`` the fusion head + LoRA on the last layer of each tower only;
#: ``"head"`` the fusion head only (projections, missing-modality embeddings, MLP);
#: ``"classifier"`` the head's MLP only (projections and missing embeddings stay as initialised).
#: The small sets are for DP-SGD, whose noise norm grows with sqrt(trainable dimension).
TRAINABLE_SCOPES: tuple[str, ...] = names.TRAINABLE_SCOPES  # secfed.names.TrainableSet

_LAYER_INDEX = re.compile(r"\.layers?\.(\d+)\.")


def select_trainable(model: nn.Module, scope: str) -> int:
    """Set ``requires_grad`` so that exactly the ``scope`` set trains; returns its size.

    Works on a fusion classifier with LoRA attached (or on :func:`secfed.models.features.feature_classifier`'s copy,
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


def load_for_scope(model_dir: Path, trainable: str) -> Any:
    """The model of ``model_dir`` (any task) with exactly the ``trainable`` set requiring grad.

    Raises:
        ModelError: a trainable set other than ``"adapter"`` on a model without the fusion head.
    """
    from secfed.models import load_model

    model, _info = load_model(model_dir)
    if trainable != "adapter":  # as loaded: LoRA on the towers + the head
        select_trainable(model, trainable)
    return model
