"""Generation: determinism, heterogeneity, and the defect ground truth."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from secfed.data import read_records
from secfed.errors import DataError
from secfed.tasks.citysafety import HAZARD_CLASSES, generate_federation
from secfed.tasks.citysafety.taxonomy import ENTERPRISES, TEST_PER_CLASS

FIXED_SEED = 20261126  # the seed of the session fixture in conftest.py


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_differs(federation, tmp_path):
    again = generate_federation(tmp_path / "again", seed=FIXED_SEED, scale="tiny")
    first, second = _tree_digest(federation.root), _tree_digest(again.root)
    assert first == second
    other = generate_federation(tmp_path / "other", seed=FIXED_SEED + 1, scale="tiny")
    third = _tree_digest(other.root)
    assert third.keys() != first.keys() or any(third[k] != first[k] for k in first)
    assert sum(third.get(k) == v for k, v in first.items()) < len(first) // 10


def test_refuses_non_empty_output_and_bad_arguments(federation, tmp_path):
    with pytest.raises(DataError, match="out_dir must be empty"):
        generate_federation(federation.root, seed=1, scale="tiny")
    with pytest.raises(DataError, match="scale must be one of"):
        generate_federation(tmp_path / "x", seed=1, scale="huge")
    with pytest.raises(DataError, match="seed must be a non-negative integer"):
        generate_federation(tmp_path / "y", seed=-3, scale="tiny")


def test_every_dataset_reads_back_and_images_are_png_frames(federation):
    for path in [*federation.enterprises.values(), federation.test_dir]:
        meta, records = read_records(path)
        assert meta.taxonomy == HAZARD_CLASSES
        assert len(records) == federation.counts[path.name if path != federation.test_dir
                                                 else "test"]
        first_image = next(r for r in records if r.image)
        with Image.open(path / first_image.image) as img:
            assert img.format == "PNG" and img.mode == "RGB" and img.size == (48, 48)


def test_label_skew_sizes_and_missing_text_differ_across_enterprises(federation):
    dists, sizes, missing_text = {}, {}, {}
    for name, path in federation.enterprises.items():
        _, records = read_records(path)
        counts = Counter(r.label for r in records)
        dists[name] = np.array([counts[c] for c in HAZARD_CLASSES], float) / len(records)
        sizes[name] = len(records)
        missing_text[name] = sum(r.text is None for r in records) / len(records)
    assert len(set(sizes.values())) == len(sizes)
    names = sorted(dists)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            # total-variation distance between label distributions: clearly skewed
            assert 0.5 * np.abs(dists[a] - dists[b]).sum() > 0.2, (a, b)
        # each enterprise's top class is its own
    assert len({int(np.argmax(d)) for d in dists.values()}) == len(dists)
    assert missing_text["residential_security"] > 0.6
    assert all(v < 0.2 for k, v in missing_text.items() if k != "residential_security")


def test_test_set_is_balanced_clean_and_covers_every_class(federation):
    _, records = read_records(federation.test_dir)
    counts = Counter(r.label for r in records)
    assert set(counts) == set(HAZARD_CLASSES)
    assert set(counts.values()) == {TEST_PER_CLASS["tiny"]}
    assert {r.source for r in records} == {p.name for p in ENTERPRISES}
    assert not (federation.root / "truth" / "test.json").exists()


def test_defect_truth_is_consistent_with_the_files(federation):
    for name, path in federation.enterprises.items():
        truth = json.loads(federation.truth_path(name).read_text())
        _, records = read_records(path)
        by_id = {r.id: r for r in records}
        assert truth["records"] == len(records)
        n_clean = len(records) - len(truth["duplicates"])
        # ~10 % wrong labels, and each one really differs from the true class
        assert abs(len(truth["mislabels"]) - 0.10 * n_clean) <= 1
        for m in truth["mislabels"]:
            assert by_id[m["id"]].label == m["given_label"] != m["true_label"]
        for m in truth["mismatches"]:
            r = by_id[m["id"]]
            assert r.text is not None and r.image is not None
            assert r.label == m["image_label"] != m["text_label"]
        assert truth["duplicates"]
        for d in truth["duplicates"]:
            dup, src = by_id[d["id"]], by_id[d["duplicate_of"]]
            assert dup.label == src.label
            if d["kind"] == "exact":
                assert dup.text == src.text
                if src.image:
                    assert (path / dup.image).read_bytes() == (path / src.image).read_bytes()
            else:
                assert d["kind"] == "near"
                if src.image:
                    a = np.asarray(Image.open(path / dup.image), float)
                    b = np.asarray(Image.open(path / src.image), float)
                    assert 0 < np.abs(a - b).mean() < 20
        defect_ids = [m["id"] for m in truth["mislabels"]] + [
            m["id"] for m in truth["mismatches"]] + [d["id"] for d in truth["duplicates"]]
        assert len(defect_ids) == len(set(defect_ids))  # one defect per record
        assert set(truth["missing_text"]) == {r.id for r in records if r.text is None}
