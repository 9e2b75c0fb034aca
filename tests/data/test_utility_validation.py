"""The validation set the utility table tunes on: like the test set, never the test set."""

from __future__ import annotations

import pytest

from secfed.data.records import read_records
from secfed.errors import DataError
from secfed.tasks.citysafety import generate_held_out


def _rows(path):
    return [(r.id, r.text, r.label, r.source) for r in read_records(path)[1]]


def test_held_out_with_the_federation_seed_is_its_test_set(federation, tmp_path):
    out = generate_held_out(tmp_path / "same", seed=federation.seed, scale="tiny")
    assert (out / "records.jsonl").read_bytes() == (
        federation.test_dir / "records.jsonl").read_bytes()
    for png in sorted((federation.test_dir / "images").iterdir())[:5]:
        assert (out / "images" / png.name).read_bytes() == png.read_bytes()


def test_held_out_from_another_seed_shares_no_record_with_the_test_set(federation, tmp_path):
    val = _rows(generate_held_out(tmp_path / "val", seed=federation.seed + 1000, scale="tiny"))
    test = _rows(federation.test_dir)
    assert len(val) == len(test)
    assert sorted(r[2] for r in val) == sorted(r[2] for r in test)  # same class counts
    texts = {r[1] for r in test if r[1]}
    assert not texts & {r[1] for r in val if r[1]}


def test_held_out_refuses_bad_arguments(tmp_path):
    with pytest.raises(DataError, match="scale must be one of"):
        generate_held_out(tmp_path / "a", seed=1, scale="huge")
    with pytest.raises(DataError, match="seed must be"):
        generate_held_out(tmp_path / "b", seed=-1, scale="tiny")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "x").write_text("x")
    with pytest.raises(DataError, match="not empty"):
        generate_held_out(tmp_path / "c", seed=1, scale="tiny")
