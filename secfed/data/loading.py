"""Turn a dataset directory into a torch ``Dataset`` following the model input contract.

Every record becomes ``input_ids``/``attention_mask`` (tokenised with the model directory's
tokenizer, padded to its max text length), ``pixel_values`` (resized to its image size,
normalised), ``text_present``/``image_present`` flags and ``labels`` (index into the model's
label list). A missing modality is a padded placeholder with its flag at 0. A classifier
without an image tower (``seq-cls``) takes no images: its records' images are not read and
every ``image_present`` is 0; one without a text tower likewise ignores the texts.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from secfed.data.records import Record, read_records
from secfed.errors import DataError, ModelError
from secfed.models.loading import load_tokenizer
from secfed.models.storage import META_FILE, TOWER_DIRS, read_meta_file

__all__ = ["ImageTextDataset", "ModelInputs", "load_dataset", "model_inputs", "pixels_to_tensor"]

# ViT input normalisation (mean 0.5, std 0.5 per channel: pixels land in [-1, 1]).
_PIXEL_MEAN = 0.5
_PIXEL_STD = 0.5


def pixels_to_tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 ``[B, H, W, 3]`` (or one ``[H, W, 3]``) -> normalised float ``[B, 3, H, W]``."""
    if frames.ndim == 3:
        frames = frames[None]
    x = torch.from_numpy(np.ascontiguousarray(frames)).to(torch.float32).div_(255.0)
    return x.permute(0, 3, 1, 2).sub_(_PIXEL_MEAN).div_(_PIXEL_STD).contiguous()


class ModelInputs:
    """What tokenising and resizing need from a model directory (read without loading weights).

    ``max_text_length``/``tokenizer`` are ``None`` for a model without a text tower,
    ``image_size`` for one without an image tower: that modality is then not read.
    """

    def __init__(self, *, labels: tuple[str, ...], max_text_length: int | None,
                 image_size: int | None, tokenizer) -> None:
        self.labels = labels
        self.max_text_length = max_text_length
        self.image_size = image_size
        self.tokenizer = tokenizer

    @property
    def modalities(self) -> tuple[str, ...]:
        """The modalities the model takes, of ``("text", "image")``."""
        return tuple(m for m, on in (("text", self.tokenizer is not None),
                                     ("image", self.image_size is not None)) if on)


def model_inputs(model_dir: Path | str) -> ModelInputs:
    """Read labels, max text length, image size and the tokenizer from a model directory.

    Works for every secfed classifier: image+text (``image-text-cls``), text only
    (``seq-cls``) and image only.

    Raises:
        ModelError: the directory is not a secfed classifier, or a tower's sizes are missing.
    """
    root = Path(model_dir)
    path = root / META_FILE
    meta = read_meta_file(root)
    labels, length, size = meta.get("labels"), meta.get("max_text_length"), meta.get("image_size")
    if not isinstance(labels, list) or not labels:
        raise ModelError(f"{path}: field 'labels' must be the list of class names (got {labels!r})")
    towers = meta.get("towers")
    if not isinstance(towers, dict) or not set(towers) & {"text", "image"}:
        raise ModelError(f"{path}: field 'towers' must name a text and/or an image tower "
                         f"(got {towers!r})")
    if "text" in towers and not isinstance(length, int):
        raise ModelError(f"{path}: field 'max_text_length' must be an integer for a model with a "
                         f"text tower (got {length!r})")
    if "image" in towers and not isinstance(size, int):
        raise ModelError(f"{path}: field 'image_size' must be an integer for a model with an "
                         f"image tower (got {size!r})")
    tokenizer = None
    if "text" in towers:
        tokenizer = load_tokenizer(root / TOWER_DIRS["text"])
        if tokenizer is None:
            raise ModelError(f"{root / TOWER_DIRS['text']}: must hold the text tokenizer "
                             "(missing)")
    return ModelInputs(labels=tuple(labels),
                       max_text_length=length if "text" in towers else None,
                       image_size=size if "image" in towers else None, tokenizer=tokenizer)


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


class ImageTextDataset(torch.utils.data.Dataset):
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
        self.modalities = inputs.modalities
        self._encode_texts(records, inputs)
        self._decode_images(records, inputs)

    def _encode_texts(self, records: list[Record], inputs: ModelInputs) -> None:
        texts = [r.text if r.text is not None and r.text.strip() else "" for r in records]
        if inputs.tokenizer is None:  # no text tower: the texts are not model inputs
            self.input_ids = torch.zeros(len(records), 1, dtype=torch.long)
            self.attention_mask = torch.zeros(len(records), 1, dtype=torch.long)
            self.text_present = torch.zeros(len(records), dtype=torch.long)
            return
        enc = inputs.tokenizer(texts, padding="max_length", truncation=True,
                               max_length=inputs.max_text_length, return_tensors="pt")
        self.input_ids = enc["input_ids"].to(torch.long)
        self.attention_mask = enc["attention_mask"].to(torch.long)
        self.text_present = torch.tensor([int(bool(t)) for t in texts], dtype=torch.long)

    def _decode_images(self, records: list[Record], inputs: ModelInputs) -> None:
        size = inputs.image_size
        if size is None:  # no image tower: images are not read
            self.image_present = torch.zeros(len(records), dtype=torch.long)
            self.frames = np.zeros((len(records), 0, 0, 3), dtype=np.uint8)
            self.pixel_values = torch.zeros(len(records), 3, 1, 1)
            return
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

    def subset(self, keep: list[int]) -> ImageTextDataset:
        """A dataset of the records at positions ``keep`` (no re-tokenising)."""
        out = ImageTextDataset.__new__(ImageTextDataset)
        out.data_dir, out.labels_names = self.data_dir, self.labels_names
        out.modalities = self.modalities
        out.records = [self.records[i] for i in keep]
        idx = torch.as_tensor(keep, dtype=torch.long)
        for name in ("labels", "input_ids", "attention_mask", "text_present", "image_present",
                     "pixel_values"):
            setattr(out, name, getattr(self, name)[idx])
        out.frames = self.frames[np.asarray(keep, dtype=np.int64)]
        return out


def load_dataset(data_dir: Path | str, *, model_dir: Path | str | None = None,
                 inputs: ModelInputs | None = None) -> ImageTextDataset:
    """Validate and load a dataset directory for the classifier in ``model_dir``.

    Pass ``inputs`` (from :func:`model_inputs`) instead of ``model_dir`` to reuse a tokenizer.

    Raises:
        DataError: a file or record is malformed (names the record and field).
        ModelError: ``model_dir`` is not a usable secfed classifier directory.
    """
    if inputs is None:
        if model_dir is None:
            raise DataError("load_dataset needs model_dir or inputs (got neither)")
        inputs = model_inputs(model_dir)
    _, records = read_records(Path(data_dir))
    return ImageTextDataset(Path(data_dir), records, inputs)
