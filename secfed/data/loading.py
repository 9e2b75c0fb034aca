"""Turn a dataset directory into a torch ``Dataset`` following the model input contract.

Every record becomes ``input_ids``/``attention_mask`` (tokenised with the model directory's
tokenizer, padded to its max text length), ``pixel_values`` (resized to its image size,
normalised), ``text_present``/``image_present`` flags and ``labels`` (index into the model's
label list). A missing modality is a padded placeholder with its flag at 0.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from secfed.crypto.errors import DataError, ModelError
from secfed.data.records import Record, read_records
from secfed.models.citysafety import pixels_to_tensor
from secfed.models.loading import load_tokenizer
from secfed.models.storage import META_FILE, TOWER_DIRS

__all__ = ["CitySafetyDataset", "ModelInputs", "load_dataset", "model_inputs"]


class ModelInputs:
    """What tokenising and resizing need from a model directory (read without loading weights)."""

    def __init__(self, *, labels: tuple[str, ...], max_text_length: int, image_size: int,
                 tokenizer) -> None:
        self.labels = labels
        self.max_text_length = max_text_length
        self.image_size = image_size
        self.tokenizer = tokenizer


def model_inputs(model_dir: Path | str) -> ModelInputs:
    """Read labels, max text length, image size and the tokenizer from a model directory.

    Raises:
        ModelError: the directory is not a secfed image+text classifier.
    """
    root = Path(model_dir)
    path = root / META_FILE
    if not path.is_file():
        raise ModelError(f"model_dir must contain {META_FILE} (missing in {str(root)!r})")
    try:
        meta = json.loads(path.read_text())
    except ValueError as exc:
        raise ModelError(f"{path}: must be JSON ({exc})") from None
    labels, length, size = meta.get("labels"), meta.get("max_text_length"), meta.get("image_size")
    if not isinstance(labels, list) or not labels:
        raise ModelError(f"{path}: field 'labels' must be the list of class names (got {labels!r})")
    if not isinstance(length, int) or not isinstance(size, int):
        raise ModelError(f"{path}: fields 'max_text_length' and 'image_size' must be integers "
                         f"(got {length!r}, {size!r}); the model needs both towers")
    tokenizer = load_tokenizer(root / TOWER_DIRS["text"])
    if tokenizer is None:
        raise ModelError(f"{root / TOWER_DIRS['text']}: must hold the text tokenizer (missing)")
    return ModelInputs(labels=tuple(labels), max_text_length=length, image_size=size,
                       tokenizer=tokenizer)


def read_frame(data_dir: Path, record: Record, size: int) -> np.ndarray:
    """The record's image as uint8 ``[size, size, 3]``. Raises :class:`DataError`."""
    assert record.image is not None
    try:
        with Image.open(data_dir / record.image) as img:
            if img.format != "PNG":
                raise DataError(f"record {record.id!r}: field 'image' must be a PNG "
                                f"(got {img.format})")
            rgb = img.convert("RGB")
            if rgb.size != (size, size):
                rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(rgb, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, SyntaxError) as exc:
        raise DataError(f"record {record.id!r}: field 'image' cannot be decoded "
                        f"({record.image!r}: {exc.__class__.__name__})") from None


class CitySafetyDataset(torch.utils.data.Dataset):
    """Pre-tokenised, pre-decoded records; items are dicts of tensors (model input contract)."""

    def __init__(self, data_dir: Path, records: list[Record], inputs: ModelInputs) -> None:
        self.data_dir = Path(data_dir)
        self.records = records
        self.labels_names = inputs.labels
        index = {name: i for i, name in enumerate(inputs.labels)}
        labels = []
        for r in records:
            if r.label not in index:
                raise DataError(f"record {r.id!r}: field 'label' must be one of the model's "
                                f"labels {list(inputs.labels)} (got {r.label!r})")
            labels.append(index[r.label])
        self.labels = torch.tensor(labels, dtype=torch.long)
        texts = [r.text if r.text is not None and r.text.strip() else "" for r in records]
        enc = inputs.tokenizer(texts, padding="max_length", truncation=True,
                               max_length=inputs.max_text_length, return_tensors="pt")
        self.input_ids = enc["input_ids"].to(torch.long)
        self.attention_mask = enc["attention_mask"].to(torch.long)
        self.text_present = torch.tensor([int(bool(t)) for t in texts], dtype=torch.long)
        size = inputs.image_size
        frames = np.zeros((len(records), size, size, 3), dtype=np.uint8)
        for i, r in enumerate(records):
            if r.image is not None:
                frames[i] = read_frame(self.data_dir, r, size)
        self.image_present = torch.tensor([int(r.image is not None) for r in records],
                                          dtype=torch.long)
        self.frames = frames
        self.pixel_values = pixels_to_tensor(frames) if len(records) else torch.empty(0, 3, size,
                                                                                     size)
        self.pixel_values[self.image_present == 0] = 0.0

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.input_ids[i],
            "attention_mask": self.attention_mask[i],
            "pixel_values": self.pixel_values[i],
            "text_present": self.text_present[i],
            "image_present": self.image_present[i],
            "labels": self.labels[i],
        }

    def subset(self, keep: list[int]) -> CitySafetyDataset:
        """A dataset of the records at positions ``keep`` (no re-tokenising)."""
        out = CitySafetyDataset.__new__(CitySafetyDataset)
        out.data_dir, out.labels_names = self.data_dir, self.labels_names
        out.records = [self.records[i] for i in keep]
        idx = torch.as_tensor(keep, dtype=torch.long)
        for name in ("labels", "input_ids", "attention_mask", "text_present", "image_present",
                     "pixel_values"):
            setattr(out, name, getattr(self, name)[idx])
        out.frames = self.frames[np.asarray(keep, dtype=np.int64)]
        return out


def load_dataset(data_dir: Path | str, *, model_dir: Path | str | None = None,
                 inputs: ModelInputs | None = None) -> CitySafetyDataset:
    """Validate and load a dataset directory for the classifier in ``model_dir``.

    Pass ``inputs`` (from :func:`model_inputs`) instead of ``model_dir`` to reuse a tokenizer.

    Raises:
        DataError: a file or record is malformed (names the record and field).
        ModelError: ``model_dir`` is not a usable image+text classifier directory.
    """
    if inputs is None:
        if model_dir is None:
            raise DataError("load_dataset needs model_dir or inputs (got neither)")
        inputs = model_inputs(model_dir)
    _, records = read_records(Path(data_dir))
    return CitySafetyDataset(Path(data_dir), records, inputs)
