"""The generative city-safety task's instruction records: deterministic, well-formed, answers
that follow the report (hazard, priority cue, action), skewed per enterprise like the demo."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from secfed.errors import DataError
from secfed.tasks.citysafety import ENTERPRISES, HAZARD_CLASSES
from secfed.tasks.citysafety.instructions import (
    ANSWER_FIELDS,
    answer_of,
    answer_text,
    generate_instruction_federation,
    parse_answer,
    pretraining_corpus,
)


def _records(path):
    return [json.loads(line) for line in (path / "records.jsonl").read_text().splitlines()]


def test_generation_is_deterministic_and_held_out_sets_are_balanced(tmp_path) -> None:
    a = generate_instruction_federation(tmp_path / "a", seed=3, scale="tiny")
    b = generate_instruction_federation(tmp_path / "b", seed=3, scale="tiny")
    c = generate_instruction_federation(tmp_path / "c", seed=4, scale="tiny")
    for name in [p.name for p in ENTERPRISES] + ["test", "validation"]:
        assert (a.root / name / "records.jsonl").read_bytes() == (
            b.root / name / "records.jsonl").read_bytes()
    assert _records(a.test_dir) != _records(c.test_dir)
    for held in (a.test_dir, a.validation_dir):
        counts = Counter(parse_answer(r["completion"])["hazard"] for r in _records(held))
        assert set(counts) == set(HAZARD_CLASSES) and len(set(counts.values())) == 1
    assert {r["prompt"] for r in _records(a.test_dir)}.isdisjoint(
        r["prompt"] for r in _records(a.validation_dir))
    with pytest.raises(DataError, match="not empty"):
        generate_instruction_federation(a.root, seed=3, scale="tiny")
    with pytest.raises(DataError, match="scale"):
        generate_instruction_federation(tmp_path / "d", seed=3, scale="huge")


def test_answers_follow_the_report(tmp_path) -> None:
    data = generate_instruction_federation(tmp_path / "g", seed=5, scale="tiny")
    seen_shift = Counter()
    for path in data.enterprises.values():
        for r in _records(path):
            assert set(r) == {"id", "prompt", "completion"}
            fields = parse_answer(r["completion"])
            assert answer_text(fields) == r["completion"]
            label = fields["hazard"]
            escalated = any(c in r["prompt"] for c in ("people injured", "spreading fast",
                                                       "children nearby", "getting worse"))
            calmed = any(c in r["prompt"] for c in ("already contained", "no one at risk",
                                                    "under control"))
            shift = 1 if escalated else -1 if calmed else 0
            seen_shift[shift] += 1
            assert fields == answer_of(label, shift), r
    assert all(seen_shift[s] > 0 for s in (-1, 0, 1))
    # skew: each enterprise's most common hazard is its heaviest class weight
    for profile in ENTERPRISES:
        counts = Counter(parse_answer(r["completion"])["hazard"]
                         for r in _records(data.enterprises[profile.name]))
        heaviest = HAZARD_CLASSES[max(range(len(HAZARD_CLASSES)),
                                      key=lambda i: profile.class_weights[i])]
        assert counts.most_common(1)[0][0] == heaviest


def test_answer_rules_and_parser() -> None:
    assert answer_of("fire_smoke", 0) == {"hazard": "fire_smoke", "priority": "high",
                                          "action": "dispatch fire brigade"}
    assert answer_of("fire_smoke", -1)["action"] == "send crew to check smoke"
    assert answer_of("crowding", 1)["priority"] == "medium"
    assert answer_of("normal", 1) == {"hazard": "normal", "priority": "low",
                                      "action": "no action"}
    assert parse_answer("garbage") == {f: "" for f in ANSWER_FIELDS}
    assert parse_answer(" hazard: flooding; priority: low; action: send pump crew\nmore") == {
        "hazard": "flooding", "priority": "low", "action": "send pump crew"}


def test_pretraining_corpus_never_pairs_an_enterprise_report_with_its_answer() -> None:
    corpus = pretraining_corpus(400, seed=1)
    assert corpus == pretraining_corpus(400, seed=1)
    answered = [t for t in corpus if "\nAnswer:" in t]
    assert 0 < len(answered) < len(corpus)
    for text in answered:  # manual lines: generic words, no ticket / work-order / patrol log
        assert not any(k in text for k in ("WO#", "Ticket", "Patrol log", "CITY-OPS"))
