"""``secfed data check`` on an instruction dataset (``causal-lm`` / ``vision-language`` models).

There are no labels to doubt, so the checks are: records the model's ``max_length`` truncates
(and those that lose every target token, which train nothing), exact duplicates (same prompt /
conversation, completion and image) and near duplicates (MiniLM sentence cosine of the whole
record, or nearly the same characters with the same numbers: a resent or retyped record) --
one record is one privacy unit, and a copy trains twice on one person's data.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import asdict, dataclass, field
from difflib import SequenceMatcher
from pathlib import Path

import numpy as np

from secfed.data.instructions import (
    INSTRUCTION_FILE,
    InstructionRecord,
    load_instruction_dataset,
)
from secfed.data.quality.clean import copy_target
from secfed.data.quality.sentences import encode_sentences
from secfed.data.quality.settings import QualitySettings

__all__ = ["InstructionQualityReport", "check_instruction_dataset", "write_cleaned_instructions"]

_NUMBER = re.compile(r"\d+")
_MAX_TOKENS = 128


@dataclass
class InstructionQualityReport:
    """What :func:`check_instruction_dataset` found, by record id."""

    records: int
    truncated: int
    without_target: int
    max_length: int
    exact_duplicates: list[dict] = field(default_factory=list)
    near_duplicates: list[dict] = field(default_factory=list)

    def flagged(self) -> set[str]:
        return {d["id"] for d in self.exact_duplicates + self.near_duplicates}

    def summary(self) -> dict[str, int]:
        return {"records": self.records, "truncated": self.truncated,
                "without_target": self.without_target,
                "exact_duplicates": len(self.exact_duplicates),
                "near_duplicates": len(self.near_duplicates)}

    def to_json(self) -> dict:
        return asdict(self) | {"summary": self.summary()}


def _text(r: InstructionRecord) -> str:
    if r.messages is not None:
        return "\n".join(f"{role}: {content}" for role, content in r.messages)
    return f"{r.prompt or ''}\n{r.completion or ''}"


def check_instruction_dataset(data_dir: Path | str, *, model_dir: Path | str,
                              settings: QualitySettings | None = None
                              ) -> InstructionQualityReport:
    """Tokenise ``data_dir`` for the generative model in ``model_dir`` and run the checks.

    Raises:
        DataError: a record is malformed. ModelError: not a generative model directory.
    """
    s = settings or QualitySettings()
    dataset = load_instruction_dataset(data_dir, model_dir=model_dir)
    records, stats = dataset.records, dataset.stats
    report = InstructionQualityReport(records=stats.records, truncated=stats.truncated,
                                      without_target=stats.without_target,
                                      max_length=stats.max_length)
    texts = [_text(r) for r in records]
    first: dict[bytes, int] = {}
    copy_of = np.full(len(records), -1)
    root = Path(data_dir)
    for i, (r, text) in enumerate(zip(records, texts)):
        h = hashlib.sha256(text.strip().encode("utf-8"))
        if r.image is not None:
            h.update(hashlib.sha256((root / r.image).read_bytes()).digest())
        key = h.digest()
        if key in first:
            copy_of[i] = first[key]
            report.exact_duplicates.append({"id": r.id, "duplicate_of": records[first[key]].id})
        else:
            first[key] = i
    emb = encode_sentences(texts, max_tokens=_MAX_TOKENS)
    sim = emb @ emb.T
    numbers = [tuple(_NUMBER.findall(t)) for t in texts]
    for i in range(len(records)):
        if copy_of[i] >= 0:
            continue
        j = _earlier_copy(i, texts, numbers, sim, copy_of, s)
        if j is not None:
            copy_of[i] = j
            report.near_duplicates.append({
                "id": records[i].id, "duplicate_of": records[j].id,
                "text_similarity": round(float(sim[i, j]), 4)})
    return report


def _earlier_copy(i: int, texts: list[str], numbers: list[tuple[str, ...]], sim: np.ndarray,
                  copy_of: np.ndarray, s: QualitySettings) -> int | None:
    """The latest earlier original that record ``i`` nearly copies: sentence cosine of at least
    ``near_duplicate_text_only``, or the same numbers and nearly the same characters (a typo
    moves a short record's sentence embedding far, a character edit barely)."""
    for j in range(i - 1, -1, -1):
        if copy_of[j] >= 0:
            continue
        if sim[i, j] >= s.near_duplicate_text_only:
            return j
        if numbers[i] == numbers[j]:
            matcher = SequenceMatcher(None, texts[i], texts[j])
            if (matcher.real_quick_ratio() >= s.near_duplicate_text_only_chars
                    and matcher.quick_ratio() >= s.near_duplicate_text_only_chars
                    and matcher.ratio() >= s.near_duplicate_text_only_chars):
                return j
    return None


def write_cleaned_instructions(data_dir: Path | str, out_dir: Path | str,
                               report: InstructionQualityReport) -> Path:
    """A copy of ``data_dir`` without the later copy of each duplicate (images copied too) and
    with ``quality_report.json``; the original is only read. Returns ``out_dir``.

    Raises:
        DataError: ``out_dir`` is the original, lies inside it, or is not empty.
    """
    src, dst = copy_target(data_dir, out_dir)
    drop = report.flagged()
    lines = (src / INSTRUCTION_FILE).read_text(encoding="utf-8").splitlines()
    kept: list[str] = []
    index = -1  # the reader's default id: the record's position among the non-empty lines
    for line in lines:
        if not line.strip():
            continue
        index += 1
        raw = json.loads(line)
        if str(raw.get("id", str(index))) in drop:
            continue
        kept.append(line)
        if raw.get("image"):
            (dst / raw["image"]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / raw["image"], dst / raw["image"])
    dst.mkdir(parents=True, exist_ok=True)
    (dst / INSTRUCTION_FILE).write_text("\n".join(kept) + "\n", encoding="utf-8")
    body = report.to_json() | {"fix": {"dropped": sorted(drop)}}
    (dst / "quality_report.json").write_text(json.dumps(body, indent=1, sort_keys=True) + "\n")
    return dst
