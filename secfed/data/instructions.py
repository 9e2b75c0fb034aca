"""Instruction datasets for generative models (``causal-lm``, ``vision-language``).

A dataset is a directory holding ``records.jsonl`` (or that file itself), one JSON object per
line, one record per privacy unit:

- ``{"prompt": str, "completion": str}``: the loss counts the completion tokens only;
- ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``: rendered with
  the tokenizer's chat template where it has one (else ``role: content`` lines); the loss counts
  the assistant turns only;
- optional ``"id"`` (string) and, for ``vision-language``, ``"image"``: a PNG/JPEG path relative
  to the dataset directory (required there: one image per record).

Every record becomes one row (never packed with another, so a per-example gradient is a
per-record one): ``input_ids``, ``attention_mask`` (right-padded to the model's max length),
``labels`` (``-100`` except on target tokens) and, for images, ``pixel_values``. A record longer
than the max length is cut at the end; :attr:`InstructionDataset.stats` counts those
(``truncated``) and those left without any target token (``without_target``: they still take
part in sampling, with zero loss).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from secfed.data.records import jsonl_objects
from secfed.errors import DataError, ModelError
from secfed.models.generative import GENERATIVE_TASKS, IGNORE_INDEX
from secfed.models.loading import load_tokenizer
from secfed.models.model_init import LM_DIR, read_model_meta

__all__ = [
    "INSTRUCTION_FILE",
    "InstructionDataset",
    "InstructionInputs",
    "InstructionRecord",
    "InstructionStats",
    "instruction_inputs",
    "load_instruction_dataset",
    "read_instruction_records",
]

INSTRUCTION_FILE = "records.jsonl"
_ROLES = ("system", "user", "assistant")
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass(frozen=True)
class InstructionRecord:
    """One record: either ``prompt``/``completion`` or ``messages``; ``image`` is optional."""

    id: str
    prompt: str | None = None
    completion: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None
    image: str | None = None


@dataclass(frozen=True)
class InstructionStats:
    """Counts reported after tokenising (none of them leaves the site)."""

    records: int
    truncated: int
    without_target: int
    max_length: int


def _check_image(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise DataError(f"{where}: field 'image' must be a relative path (got {value!r})")
    posix = PurePosixPath(value)
    if posix.is_absolute() or ".." in posix.parts or "\\" in value:
        raise DataError(f"{where}: field 'image' must be a relative path inside the dataset "
                        f"directory (got {value!r})")
    if posix.suffix.lower() not in _IMAGE_SUFFIXES:
        raise DataError(f"{where}: field 'image' must name a PNG or JPEG file (got {value!r})")
    return value


def _parse_messages(raw: Any, where: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(raw, list) or not raw:
        raise DataError(f"{where}: field 'messages' must be a non-empty list (got {raw!r:.60})")
    out = []
    for j, m in enumerate(raw):
        if (not isinstance(m, dict) or set(m) != {"role", "content"}
                or m["role"] not in _ROLES or not isinstance(m["content"], str)):
            raise DataError(f"{where}: messages[{j}] must be {{'role': one of {list(_ROLES)}, "
                            f"'content': str}} (got {m!r:.80})")
        out.append((m["role"], m["content"]))
    if not any(role == "assistant" for role, _ in out):
        raise DataError(f"{where}: field 'messages' must hold at least one assistant turn "
                        "(the loss counts assistant tokens only)")
    return tuple(out)


def _parse(raw: Any, where: str, index: int) -> InstructionRecord:
    if not isinstance(raw, dict):
        raise DataError(f"{where}: must be a JSON object (got {type(raw).__name__})")
    allowed = {"id", "prompt", "completion", "messages", "image"}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise DataError(f"{where}: fields must be among {sorted(allowed)} (got {unknown})")
    rid = raw.get("id", str(index))
    if not isinstance(rid, str) or not rid:
        raise DataError(f"{where}: field 'id' must be a non-empty string (got {rid!r})")
    image = _check_image(raw["image"], where) if raw.get("image") is not None else None
    if "messages" in raw:
        if "prompt" in raw or "completion" in raw:
            raise DataError(f"{where}: a record has either 'messages' or 'prompt'/'completion' "
                            "(got both)")
        return InstructionRecord(rid, messages=_parse_messages(raw["messages"], where),
                                 image=image)
    prompt, completion = raw.get("prompt"), raw.get("completion")
    if not isinstance(prompt, str) or not isinstance(completion, str) or not completion:
        raise DataError(f"{where}: fields 'prompt' (string) and 'completion' (non-empty string) "
                        f"are required (got {type(prompt).__name__}, {type(completion).__name__})")
    return InstructionRecord(rid, prompt=prompt, completion=completion, image=image)


def _records_file(data: Path) -> Path:
    path = data / INSTRUCTION_FILE if data.is_dir() else data
    if not path.is_file():
        raise DataError(f"{data}: an instruction dataset must be a directory holding "
                        f"{INSTRUCTION_FILE} or that file (missing)")
    return path


def read_instruction_records(data: Path | str) -> list[InstructionRecord]:
    """Parse and validate every line of the dataset's ``records.jsonl``.

    Raises:
        DataError: the file is missing, a line is not JSON or breaks the format (names the
            line and the field), or two records share an id.
    """
    path = _records_file(Path(data))
    out: list[InstructionRecord] = []
    seen: set[str] = set()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: must be UTF-8 ({exc})") from None
    for _, where, raw in jsonl_objects(lines, path.name):
        record = _parse(raw, where, len(out))
        if record.id in seen:
            raise DataError(f"{where}: field 'id' must be unique (got {record.id!r} twice)")
        seen.add(record.id)
        out.append(record)
    if not out:
        raise DataError(f"{path}: must hold at least one record (got 0)")
    return out


@dataclass(frozen=True)
class InstructionInputs:
    """What tokenising needs from a generative model directory (read without its weights)."""

    task: str
    tokenizer: Any
    max_length: int
    image_size: int | None = None
    image_tokens: int | None = None
    image_token_id: int | None = None
    image_mean: tuple[float, ...] | None = None
    image_std: tuple[float, ...] | None = None


def instruction_inputs(model_dir: Path | str) -> InstructionInputs:
    """Tokenizer, max length and image settings of a generative model directory.

    Raises:
        ModelError: not a ``causal-lm`` / ``vision-language`` model directory.
    """
    meta = read_model_meta(Path(model_dir))
    task = meta.get("task")
    if task not in GENERATIVE_TASKS:
        raise ModelError(f"an instruction dataset needs a generative model (task in "
                         f"{GENERATIVE_TASKS}; got {task!r})")
    tokenizer = load_tokenizer(Path(model_dir) / LM_DIR)
    if tokenizer is None or not getattr(tokenizer, "is_fast", False):
        raise ModelError(f"{Path(model_dir) / LM_DIR}: must hold a fast (tokenizer.json) "
                         "tokenizer")
    try:
        return InstructionInputs(
            task=task, tokenizer=tokenizer, max_length=int(meta["max_text_length"]),
            image_size=meta.get("image_size"), image_tokens=meta.get("image_tokens"),
            image_token_id=meta.get("image_token_id"),
            image_mean=tuple(meta["image_mean"]) if meta.get("image_mean") else None,
            image_std=tuple(meta["image_std"]) if meta.get("image_std") else None,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"model directory {model_dir}: malformed generative fields ({exc})"
                         ) from None


def _plain_render(messages: tuple[tuple[str, str], ...], upto: int, generation: bool) -> str:
    text = "".join(f"{role}: {content}\n" for role, content in messages[:upto])
    return text + ("assistant: " if generation else "")


def _chat_ids(tokenizer: Any, messages: tuple[tuple[str, str], ...]
              ) -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation and, per token, 1 if it belongs to an assistant
    turn (character spans from rendering each prefix, mapped through the offsets)."""
    dicts = [{"role": r, "content": c} for r, c in messages]
    has_template = bool(getattr(tokenizer, "chat_template", None))

    def render(upto: int, generation: bool) -> str:
        if not has_template:
            return _plain_render(messages, upto, generation)
        if upto == 0 and not generation:
            return ""
        return str(tokenizer.apply_chat_template(dicts[:upto], tokenize=False,
                                                 add_generation_prompt=generation))

    full = render(len(messages), False)
    spans = []
    for i, (role, _) in enumerate(messages):
        if role != "assistant":
            continue
        start, end = render(i, True), render(i + 1, False)
        if not (full.startswith(start) and full.startswith(end)):
            raise DataError("the chat template does not render a conversation as the "
                            "concatenation of its turns; use prompt/completion records")
        spans.append((len(start), len(end)))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    target = [int(any(s <= a and b <= e and b > a for s, e in spans))
              for a, b in enc["offset_mapping"]]
    return list(enc["input_ids"]), target


def _prompt_ids(tokenizer: Any, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    head = list(tokenizer(prompt, add_special_tokens=True)["input_ids"]) if prompt else []
    tail = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        tail.append(int(tokenizer.eos_token_id))  # the model learns to stop
    return head + tail, [0] * len(head) + [1] * len(tail)


def _with_image(ids: list[int], target: list[int], inputs: InstructionInputs, bos: int | None
                ) -> tuple[list[int], list[int]]:
    n = int(inputs.image_tokens or 0)
    at = 1 if ids and bos is not None and ids[0] == bos else 0
    return (ids[:at] + [int(inputs.image_token_id)] * n + ids[at:],  # type: ignore[arg-type]
            target[:at] + [0] * n + target[at:])


def _read_image(data_dir: Path, record: InstructionRecord, inputs: InstructionInputs
                ) -> torch.Tensor:
    size = int(inputs.image_size)  # type: ignore[arg-type]
    try:
        with Image.open(data_dir / str(record.image)) as img:
            rgb = img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    except (OSError, UnidentifiedImageError, SyntaxError) as exc:
        raise DataError(f"record {record.id!r}: field 'image' cannot be decoded "
                        f"({record.image!r}: {exc.__class__.__name__})") from None
    x = torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(inputs.image_mean or (0.5, 0.5, 0.5)).view(3, 1, 1)
    std = torch.tensor(inputs.image_std or (0.5, 0.5, 0.5)).view(3, 1, 1)
    return ((x - mean) / std).contiguous()


class InstructionDataset(torch.utils.data.Dataset):
    """Tokenised records; items are ``input_ids``, ``attention_mask``, ``labels`` ``[L]`` (and
    ``pixel_values`` ``[3, S, S]`` for vision-language)."""

    def __init__(self, data_dir: Path, records: list[InstructionRecord],
                 inputs: InstructionInputs) -> None:
        tok, length = inputs.tokenizer, inputs.max_length
        vision = inputs.task == "vision-language"
        if vision and (inputs.image_tokens or 0) + 2 > length:
            raise DataError(f"max length {length} must exceed the {inputs.image_tokens} image "
                            "tokens of one image")
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        n = len(records)
        self.records = records
        self.input_ids = torch.full((n, length), int(pad), dtype=torch.long)
        self.attention_mask = torch.zeros((n, length), dtype=torch.long)
        self.labels = torch.full((n, length), IGNORE_INDEX, dtype=torch.long)
        pixels = []
        truncated = without_target = 0
        for i, r in enumerate(records):
            if r.messages is not None:
                ids, target = _chat_ids(tok, r.messages)
            else:
                ids, target = _prompt_ids(tok, r.prompt or "", r.completion or "")
            if vision:
                if r.image is None:
                    raise DataError(f"record {r.id!r}: field 'image' is required for a "
                                    "vision-language model (one image per record)")
                ids, target = _with_image(ids, target, inputs, tok.bos_token_id)
                pixels.append(_read_image(Path(data_dir), r, inputs))
            if len(ids) > length:
                truncated += 1
                ids, target = ids[:length], target[:length]
            if not any(target[1:]):  # position 0 is never predicted
                without_target += 1
            k = len(ids)
            self.input_ids[i, :k] = torch.tensor(ids, dtype=torch.long)
            self.attention_mask[i, :k] = 1
            self.labels[i, :k] = torch.where(torch.tensor(target, dtype=torch.bool),
                                             self.input_ids[i, :k], IGNORE_INDEX)
        self.pixel_values = torch.stack(pixels) if pixels else None
        self.stats = InstructionStats(records=n, truncated=truncated,
                                      without_target=without_target, max_length=length)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = {"input_ids": self.input_ids[i], "attention_mask": self.attention_mask[i],
                "labels": self.labels[i]}
        if self.pixel_values is not None:
            item["pixel_values"] = self.pixel_values[i]
        return item


def load_instruction_dataset(data: Path | str, *, model_dir: Path | str | None = None,
                             inputs: InstructionInputs | None = None) -> InstructionDataset:
    """Validate and tokenise an instruction dataset for the generative model in ``model_dir``.

    Raises:
        DataError: a record is malformed (names the line and field) or an image is unreadable.
        ModelError: ``model_dir`` is not a generative secfed model directory.
    """
    if inputs is None:
        if model_dir is None:
            raise DataError("load_instruction_dataset needs model_dir or inputs (got neither)")
        inputs = instruction_inputs(model_dir)
    path = Path(data)
    records = read_instruction_records(path)
    return InstructionDataset(path if path.is_dir() else path.parent, records, inputs)
