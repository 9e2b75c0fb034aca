"""The on-disk dataset format: ``records.jsonl`` + ``images/*.png`` + ``meta.json``.

This is the format a user's real data uses too, so reading is strict: every problem raises
:class:`~secfed.errors.DataError` naming the file, the line, the record id and the field.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from secfed.errors import DataError

RECORDS_FILE = "records.jsonl"
META_FILE = "meta.json"
IMAGES_DIR = "images"
FORMAT_VERSION = "secfed-dataset/v1"

_REQUIRED = ("id", "text", "image", "label")
_ALLOWED = frozenset(_REQUIRED) | {"source"}
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class Record:
    """One incident: an optional report text, an optional image (path relative to the dataset
    directory) and a class name. At least one modality is present."""

    id: str
    text: str | None
    image: str | None
    label: str
    source: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "text": self.text, "image": self.image,
                               "label": self.label}
        if self.source is not None:
            out["source"] = self.source
        return out


@dataclass(frozen=True)
class DatasetMeta:
    """``meta.json``: the taxonomy (ordered class names) and where the data came from.

    ``label_descriptions`` (optional) gives some classes a few words each, the zero-shot prompts
    ``secfed data check`` scores report texts against; a class without one is described by its
    name.
    """

    taxonomy: tuple[str, ...]
    enterprise: str
    seed: int | None = None
    scale: str | None = None
    format: str = FORMAT_VERSION
    label_descriptions: Mapping[str, tuple[str, ...]] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"format": self.format, "taxonomy": list(self.taxonomy),
                               "enterprise": self.enterprise, "seed": self.seed,
                               "scale": self.scale}
        if self.label_descriptions is not None:
            out["label_descriptions"] = {k: list(v) for k, v in self.label_descriptions.items()}
        return out


def write_json(path: Path, obj: Any) -> None:
    """Canonical JSON (sorted keys, fixed separators, trailing newline) so bytes are stable."""
    path.write_text(json.dumps(obj, sort_keys=True, indent=1, ensure_ascii=False) + "\n",
                    encoding="utf-8")


def write_records(data_dir: Path, records: list[Record], meta: DatasetMeta) -> None:
    """Write ``records.jsonl`` and ``meta.json`` into ``data_dir`` (images are written by the
    caller). Raises :class:`DataError` if a record breaks the format."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for lineno, record in enumerate(records, start=1):
        _check_record(record.to_json(), meta.taxonomy, where=f"record {lineno}")
        lines.append(json.dumps(record.to_json(), sort_keys=True, ensure_ascii=False))
    (data_dir / RECORDS_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
    write_json(data_dir / META_FILE, meta.to_json())


def read_meta(data_dir: Path) -> DatasetMeta:
    """Read and validate ``meta.json``. Raises :class:`DataError`."""
    path = Path(data_dir) / META_FILE
    if not path.is_file():
        raise DataError(f"{path}: dataset directory must contain {META_FILE} (missing)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: must be UTF-8 JSON ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(raw, dict):
        raise DataError(f"{path}: must be a JSON object (got {type(raw).__name__})")
    taxonomy = raw.get("taxonomy")
    if (not isinstance(taxonomy, list) or len(taxonomy) < 2
            or not all(isinstance(c, str) and c for c in taxonomy)
            or len(set(taxonomy)) != len(taxonomy)):
        raise DataError(f"{path}: field 'taxonomy' must be a list of at least 2 distinct "
                        f"non-empty class names (got {taxonomy!r})")
    fmt = raw.get("format", FORMAT_VERSION)
    if fmt != FORMAT_VERSION:
        raise DataError(f"{path}: field 'format' must be {FORMAT_VERSION!r} (got {fmt!r})")
    seed = raw.get("seed")
    if seed is not None and not isinstance(seed, int):
        raise DataError(f"{path}: field 'seed' must be an integer or null (got {seed!r})")
    return DatasetMeta(taxonomy=tuple(taxonomy), enterprise=str(raw.get("enterprise", "")),
                       seed=seed, scale=raw.get("scale"), format=fmt,
                       label_descriptions=_label_descriptions(raw, taxonomy, path))


def _label_descriptions(raw: dict, taxonomy: list[str], path: Path) -> dict[str, tuple[
        str, ...]] | None:
    """``meta.json``'s optional ``label_descriptions``: class name -> non-empty list of phrases."""
    found = raw.get("label_descriptions")
    if found is None:
        return None
    if not isinstance(found, dict) or not all(
            k in taxonomy and isinstance(v, list) and v
            and all(isinstance(p, str) and p.strip() for p in v) for k, v in found.items()):
        raise DataError(f"{path}: field 'label_descriptions' must map classes of the taxonomy "
                        f"to non-empty lists of phrases (got {found!r:.120})")
    return {k: tuple(v) for k, v in found.items()}


def _check_record(raw: Any, taxonomy: tuple[str, ...], *, where: str) -> None:
    if not isinstance(raw, dict):
        raise DataError(f"{where}: must be a JSON object (got {type(raw).__name__})")
    rid = raw.get("id")
    label = f"{where} (id {rid!r})" if isinstance(rid, str) else where
    for key in _REQUIRED:
        if key not in raw:
            raise DataError(f"{label}: field {key!r} is required (missing)")
    unknown = sorted(set(raw) - _ALLOWED)
    if unknown:
        raise DataError(f"{label}: fields must be among {sorted(_ALLOWED)} (got {unknown})")
    if not isinstance(rid, str) or not rid or len(rid) > 200:
        raise DataError(f"{label}: field 'id' must be a non-empty string of at most 200 "
                        f"characters (got {rid!r})")
    text, image = raw["text"], raw["image"]
    if text is not None and not isinstance(text, str):
        raise DataError(f"{label}: field 'text' must be a string or null "
                        f"(got {type(text).__name__})")
    if image is not None:
        if not isinstance(image, str) or not image:
            raise DataError(f"{label}: field 'image' must be a relative path or null "
                            f"(got {image!r})")
        posix = PurePosixPath(image)
        if posix.is_absolute() or ".." in posix.parts or "\\" in image:
            raise DataError(f"{label}: field 'image' must be a relative path inside the "
                            f"dataset directory (got {image!r})")
        if posix.suffix.lower() != ".png":
            raise DataError(f"{label}: field 'image' must name a .png file (got {image!r})")
    if (text is None or not text.strip()) and image is None:
        raise DataError(f"{label}: fields 'text' and 'image' must not both be empty")
    if raw["label"] not in taxonomy:
        raise DataError(f"{label}: field 'label' must be one of {list(taxonomy)} "
                        f"(got {raw['label']!r})")
    source = raw.get("source")
    if source is not None and not isinstance(source, str):
        raise DataError(f"{label}: field 'source' must be a string or null (got {source!r})")


def jsonl_objects(lines: Iterable[str], name: str) -> Iterator[tuple[int, str, Any]]:
    """``(line number, "NAME line N", parsed JSON)`` for each non-blank line of a JSON Lines
    file called ``name``.

    Raises:
        DataError: a line is not one JSON value (names the file and line).
    """
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{name} line {lineno}"
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: must be one JSON object per line ({exc.msg})") from None
        yield lineno, where, raw


def read_records(data_dir: Path, *, check_images: bool = True) -> tuple[DatasetMeta, list[Record]]:
    """Read and validate a dataset directory.

    Checks every record's fields, that ids are unique, and (``check_images``) that every image
    path names an existing PNG file inside the directory.

    Raises:
        DataError: naming the file, line, record id and field at fault.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: dataset must be a directory (not found)")
    meta = read_meta(data_dir)
    path = data_dir / RECORDS_FILE
    if not path.is_file():
        raise DataError(f"{path}: dataset directory must contain {RECORDS_FILE} (missing)")
    records: list[Record] = []
    seen: dict[str, int] = {}
    root = data_dir.resolve()
    with path.open("r", encoding="utf-8") as fh:
        for lineno, where, raw in jsonl_objects(fh, path.name):
            _check_record(raw, meta.taxonomy, where=where)
            rid = raw["id"]
            if rid in seen:
                raise DataError(f"{where} (id {rid!r}): field 'id' must be unique "
                                f"(also on line {seen[rid]})")
            seen[rid] = lineno
            if check_images and raw["image"] is not None:
                image_path = (data_dir / raw["image"]).resolve()
                if not image_path.is_relative_to(root):
                    raise DataError(f"{where} (id {rid!r}): field 'image' must stay inside the "
                                    f"dataset directory (got {raw['image']!r})")
                if not image_path.is_file():
                    raise DataError(f"{where} (id {rid!r}): field 'image' names a missing file "
                                    f"(got {raw['image']!r})")
                with image_path.open("rb") as img:
                    if img.read(8) != _PNG_MAGIC:
                        raise DataError(f"{where} (id {rid!r}): field 'image' must be a PNG "
                                        f"file (got {raw['image']!r}, bad signature)")
            records.append(Record(id=rid, text=raw["text"], image=raw["image"],
                                  label=raw["label"], source=raw.get("source")))
    if not records:
        raise DataError(f"{path}: must hold at least one record (got 0)")
    return meta, records
