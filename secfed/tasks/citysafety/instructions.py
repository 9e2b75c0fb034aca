"""The generative city-safety task: an incident report in, a structured answer out.

Each enterprise writes its reports in its own vocabulary (``reports.py``) about its own mix of
hazards (``taxonomy.ENTERPRISES``); the answer names three fields::

    hazard: fire_smoke; priority: high; action: dispatch fire brigade

``hazard`` is the class; ``priority`` starts from the class's base level and moves one step up
when the report carries an escalation cue ("people injured") or down for a calming one
("already contained"); ``action`` follows from hazard and priority (the urgent or the routine
response of that hazard). A vague report ("see attached") names no hazard at all, as in the
classification task.

Records are written in the instruction format of ``docs/MODELS.md`` (``records.jsonl``, one
``{"prompt", "completion"}`` object per line); one record is one privacy unit. numpy's
Generator is used for *data* only.

The vision-language variant (``vision=True``) adds the camera frame of each incident (the
classification task's procedural scenes, in the enterprise's camera style) as
``images/<id>.png`` and an ``"image"`` field; prompts and answers are the text variant's, record
for record (the frames come from a separate random stream). The frame shows the hazard even when
the report is too vague to name it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from secfed.tasks.citysafety.generate import checked_out_dir
from secfed.tasks.citysafety.reports import write_report
from secfed.tasks.citysafety.scenes import render_scene
from secfed.tasks.citysafety.taxonomy import (
    ENTERPRISES,
    HAZARD_CLASSES,
    HAZARD_DESCRIPTIONS,
    EnterpriseProfile,
)

__all__ = [
    "ANSWER_FIELDS",
    "PRIORITIES",
    "GenerativeData",
    "answer_of",
    "answer_text",
    "generate_instruction_federation",
    "parse_answer",
    "pretraining_corpus",
    "prompt_of",
]

ANSWER_FIELDS = ("hazard", "priority", "action")
PRIORITIES = ("low", "medium", "high")

#: The priority a hazard starts from (index into :data:`PRIORITIES`).
_BASE_PRIORITY = {"fire_smoke": 2, "flooding": 1, "structural_damage": 2, "intrusion": 1,
                  "equipment_fault": 1, "crowding": 0, "normal": 0}
#: Per hazard: (routine response, urgent response); urgent when the priority is high.
_ACTIONS = {
    "fire_smoke": ("send crew to check smoke", "dispatch fire brigade"),
    "flooding": ("send pump crew", "close area and pump out"),
    "structural_damage": ("book structural inspection", "cordon off and evacuate"),
    "intrusion": ("review camera footage", "send guards and call police"),
    "equipment_fault": ("schedule repair", "isolate equipment now"),
    "crowding": ("monitor on camera", "deploy stewards"),
    "normal": ("no action", "no action"),
}
_ESCALATE = ("people injured", "spreading fast", "children nearby", "getting worse")
_CALM = ("already contained", "minor, no one at risk", "under control")
_CUE_RATE = 0.3  # each of escalation / calming, per non-normal report

#: Instruction records per enterprise by scale (the classification task's sizes, capped: one
#: record is one privacy unit and every record is a whole sequence).
_SIZES = {"tiny": {"energy_utility": 150, "residential_security": 100, "city_operations": 200},
          "demo": {"energy_utility": 1200, "residential_security": 800, "city_operations": 1500},
          "full": {"energy_utility": 3000, "residential_security": 2000,
                   "city_operations": 4000}}
_TEST_PER_CLASS = {"tiny": 10, "demo": 40, "full": 100}
_ANSWER = re.compile(r"\s*hazard:\s*([^;]*?)\s*;\s*priority:\s*([^;]*?)\s*;\s*action:\s*(.*?)\s*$")


def prompt_of(report: str) -> str:
    """The instruction prompt around one incident report."""
    return f"Incident report: {report}\nAnswer:"


def answer_text(fields: dict[str, str]) -> str:
    """``hazard: X; priority: Y; action: Z`` (the completion, with its leading space)."""
    return f" hazard: {fields['hazard']}; priority: {fields['priority']}; action: {fields['action']}"


def parse_answer(text: str) -> dict[str, str]:
    """The three fields of a generated answer (first line only); missing fields are ``""``."""
    match = _ANSWER.match(text.split("\n", 1)[0])
    if match is None:
        return {f: "" for f in ANSWER_FIELDS}
    return dict(zip(ANSWER_FIELDS, match.groups()))


def answer_of(label: str, shift: int) -> dict[str, str]:
    """The answer for a hazard whose report moves the priority by ``shift`` (-1, 0, 1)."""
    level = min(2, max(0, _BASE_PRIORITY[label] + shift)) if label != "normal" else 0
    priority = PRIORITIES[level]
    return {"hazard": label, "priority": priority,
            "action": _ACTIONS[label][1 if priority == "high" else 0]}


def _incident(profile: EnterpriseProfile, label: str,
              rng: np.random.Generator) -> tuple[str, dict[str, str]]:
    report = write_report(profile.name, label, rng)
    shift = 0
    if label != "normal":
        u = rng.random()
        if u < _CUE_RATE:
            shift, cue = 1, str(rng.choice(_ESCALATE))
        elif u < 2 * _CUE_RATE:
            shift, cue = -1, str(rng.choice(_CALM))
        if shift:
            report = f"{report.rstrip('.')}, {cue}."
    return report, answer_of(label, shift)


def _record(report: str, fields: dict[str, str], rid: str) -> dict[str, str]:
    return {"id": rid, "prompt": prompt_of(report), "completion": answer_text(fields)}


def _write(out: Path, records: list[dict[str, str]],
           frames: list[np.ndarray] | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if frames is not None:
        from PIL import Image

        (out / "images").mkdir(exist_ok=True)
        for record, frame in zip(records, frames, strict=True):
            record["image"] = f"images/{record['id']}.png"
            Image.fromarray(frame, mode="RGB").save(out / record["image"], format="PNG")
    lines = [json.dumps(r, sort_keys=True, ensure_ascii=False) for r in records]
    (out / "records.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _class_counts(weights: tuple[float, ...], n: int) -> list[int]:
    raw = np.asarray(weights) / sum(weights) * n
    counts = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - counts))[: n - int(counts.sum())]:
        counts[i] += 1
    return [int(c) for c in counts]


@dataclass(frozen=True)
class GenerativeData:
    """Where :func:`generate_instruction_federation` wrote what."""

    root: Path
    enterprises: dict[str, Path]
    test_dir: Path
    validation_dir: Path
    counts: dict[str, int] = field(default_factory=dict)


def _frames(profiles: list[EnterpriseProfile], records: list[dict[str, str]],
            rng: np.random.Generator) -> list[np.ndarray]:
    """One camera frame per record: its hazard, drawn in its enterprise's camera style."""
    return [render_scene(parse_answer(r["completion"])["hazard"], rng,
                         night_fraction=p.night_fraction, tint=p.tint)
            for p, r in zip(profiles, records, strict=True)]


def _held_out(rng: np.random.Generator, per_class: int, prefix: str
              ) -> tuple[list[dict[str, str]], list[EnterpriseProfile]]:
    """Every class equally, each report in the style of a random enterprise (returned too)."""
    out, profiles = [], []
    for label in HAZARD_CLASSES:
        for _ in range(per_class):
            profile = ENTERPRISES[int(rng.integers(0, len(ENTERPRISES)))]
            report, fields = _incident(profile, label, rng)
            out.append(_record(report, fields, f"{prefix}-{len(out):05d}"))
            profiles.append(profile)
    order = rng.permutation(len(out))
    return [out[int(i)] for i in order], [profiles[int(i)] for i in order]


def generate_instruction_federation(out_dir: Path | str, *, seed: int,
                                    scale: str = "demo", vision: bool = False) -> GenerativeData:
    """Write each enterprise's instruction records, a held-out ``test/`` and ``validation/``;
    with ``vision``, each record also carries its camera frame (``images/<id>.png``).

    Raises:
        DataError: bad scale or seed, or ``out_dir`` is not empty.
    """
    root = checked_out_dir(out_dir, seed=seed, scale=scale)
    seeds = np.random.SeedSequence([seed, 0x6E6]).spawn(len(ENTERPRISES) + 2)
    # frames from streams of their own, so the text records equal the text-only variant's
    frame_rngs = [np.random.default_rng(s)
                  for s in np.random.SeedSequence([seed, 0x1A6]).spawn(len(ENTERPRISES) + 2)]
    paths, counts = {}, {}
    for k, (profile, ss) in enumerate(zip(ENTERPRISES, seeds)):
        rng = np.random.default_rng(ss)
        records = []
        per_class = _class_counts(profile.class_weights, _SIZES[scale][profile.name])
        for label, count in zip(HAZARD_CLASSES, per_class):
            for _ in range(count):
                records.append(_incident(profile, label, rng))
        prefix = "".join(w[0] for w in profile.name.split("_"))
        order = rng.permutation(len(records))
        rows = [_record(*records[int(i)], f"{prefix}-{j:05d}") for j, i in enumerate(order)]
        frames = _frames([profile] * len(rows), rows, frame_rngs[k]) if vision else None
        _write(root / profile.name, rows, frames)
        paths[profile.name], counts[profile.name] = root / profile.name, len(rows)
    per_class = _TEST_PER_CLASS[scale]
    for name, ss, frame_rng in (("test", seeds[-2], frame_rngs[-2]),
                                ("validation", seeds[-1], frame_rngs[-1])):
        held, profiles = _held_out(np.random.default_rng(ss), per_class,
                                   "test" if name == "test" else "val")
        _write(root / name, held, _frames(profiles, held, frame_rng) if vision else None)
        counts[name] = len(held)
    (root / "federation.json").write_text(json.dumps(
        {"task": "generative", "seed": seed, "scale": scale, "enterprises": sorted(paths),
         "counts": counts, "vision": vision}, sort_keys=True, indent=1) + "\n")
    return GenerativeData(root=root, enterprises=paths, test_dir=root / "test",
                          validation_dir=root / "validation", counts=counts)


def pretraining_corpus(n: int, *, seed: int) -> list[str]:
    """Generic city-safety text for the stand-in foundation model: unlabelled reports in every
    enterprise's style, and safety-manual lines that say, in general words, what each hazard is,
    how urgent it is and what to do (answers to generic descriptions, never to a report).

    The reports teach the domain's language; the manual lines teach the answer's words. No
    enterprise's report is ever paired with its answer here, so what fine-tuning adds is the
    mapping from each enterprise's own wording to the answer.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x9E7]))
    out = []
    for _ in range(n):
        if rng.random() < 0.6:
            profile = ENTERPRISES[int(rng.integers(0, len(ENTERPRISES)))]
            label = HAZARD_CLASSES[int(rng.integers(0, len(HAZARD_CLASSES)))]
            out.append(write_report(profile.name, label, rng))
            continue
        label = HAZARD_CLASSES[int(rng.integers(0, len(HAZARD_CLASSES)))]
        words = str(rng.choice(HAZARD_DESCRIPTIONS[label]))
        shift = int(rng.integers(-1, 2)) if label != "normal" else 0
        cue = {1: f", {rng.choice(_ESCALATE)}", -1: f", {rng.choice(_CALM)}", 0: ""}[shift]
        out.append(prompt_of(f"{words}{cue}") + answer_text(answer_of(label, shift)))
    return out
