"""Train a fusion classifier's head on cached tower features (towers frozen).

With the towers frozen, their pooled outputs never change: :func:`tower_features` computes them
once, :func:`feature_classifier` copies the head over :class:`FeatureTower` stand-ins, and
training that copy is the same computation, with the same per-example gradients, as training
the whole model.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from secfed import progress
from secfed.errors import ModelError
from secfed.models.classifiers import FusionClassifier

__all__ = [
    "FeatureDataset",
    "FeatureTower",
    "cached_tower_features",
    "feature_classifier",
    "features_key",
    "tower_features",
]


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


def tower_features(model: nn.Module, dataset, *, batch_size: int = 64,
                   label: str = "tower features") -> dict[str, torch.Tensor]:
    """Pooled tower outputs of every record (towers in eval mode, no gradient).

    Minutes at the demo's scale on 2 cores: shown as progress (``label``, one unit per record)
    on stderr. ``dataset`` items follow the model input contract. Returns ``text`` ``[N, Ht]``, ``image``
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
        with torch.no_grad(), progress.task(label, total=len(dataset)) as bar:
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
                bar.advance(len(items))
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
        for k in _INPUT_KEYS:  # ImageTextDataset keeps each input as one tensor
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
    features = tower_features(model, dataset, batch_size=batch_size,
                              label=f"tower features ({name}, {len(dataset)} records)")
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
