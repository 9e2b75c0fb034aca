"""The on-disk format: round trip, and a precise DataError for each way a file can be wrong."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from secfed.data import DatasetMeta, Record, read_records, write_records
from secfed.errors import DataError
from secfed.tasks.citysafety import HAZARD_CLASSES


@pytest.fixture()
def small_dataset(tmp_path):
    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(root / "images" / "a.png")
    records = [
        Record(id="a", text="smoke in stairwell", image="images/a.png", label="fire_smoke",
               source="x"),
        Record(id="b", text=None, image="images/a.png", label="normal"),
        Record(id="c", text="gate forced", image=None, label="intrusion"),
    ]
    write_records(root, records, DatasetMeta(taxonomy=HAZARD_CLASSES, enterprise="x", seed=3))
    return root, records


def test_round_trip(small_dataset):
    root, records = small_dataset
    meta, back = read_records(root)
    assert back == records
    assert meta.taxonomy == HAZARD_CLASSES and meta.enterprise == "x" and meta.seed == 3


def _rewrite(root, mutate):
    lines = [json.loads(x) for x in (root / "records.jsonl").read_text().splitlines()]
    mutate(lines)
    (root / "records.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")


@pytest.mark.parametrize(
    ("mutate", "pattern"),
    [
        (lambda ls: ls[1].pop("label"), r"line 2 \(id 'b'\): field 'label' is required"),
        (lambda ls: ls[1].update(label="fire"), r"line 2 \(id 'b'\): field 'label' must be one of"),
        (lambda ls: ls[2].update(id="a"), r"line 3 \(id 'a'\): field 'id' must be unique"),
        (lambda ls: ls[0].update(image="../../etc/passwd.png"), r"field 'image' must be a relative"),
        (lambda ls: ls[0].update(image="/abs/x.png"), r"field 'image' must be a relative"),
        (lambda ls: ls[0].update(image="images/nope.png"), r"id 'a'\): field 'image' names a missing"),
        (lambda ls: ls[0].update(image="images/a.jpg"), r"field 'image' must name a .png"),
        (lambda ls: ls[2].update(text=" "), r"line 3 \(id 'c'\): fields 'text' and 'image' must not"),
        (lambda ls: ls[0].update(text=5), r"field 'text' must be a string or null \(got int\)"),
        (lambda ls: ls[0].update(colour="red"), r"fields must be among .* \(got \['colour'\]\)"),
        (lambda ls: ls[0].update(id=""), r"field 'id' must be a non-empty string"),
    ],
)
def test_bad_record_raises_data_error_naming_record_and_field(small_dataset, mutate, pattern):
    root, _ = small_dataset
    _rewrite(root, mutate)
    with pytest.raises(DataError, match=pattern):
        read_records(root)


def test_bad_files(small_dataset, tmp_path):
    root, _ = small_dataset
    (root / "images" / "a.png").write_bytes(b"GIF89a not a png")
    with pytest.raises(DataError, match=r"id 'a'\): field 'image' must be a PNG"):
        read_records(root)
    with (root / "records.jsonl").open("a") as fh:
        fh.write("{not json\n")
    with pytest.raises(DataError, match=r"line 4: must be one JSON object per line"):
        read_records(root, check_images=False)
    (root / "meta.json").write_text(json.dumps({"taxonomy": ["only"]}))
    with pytest.raises(DataError, match=r"field 'taxonomy' must be a list of at least 2"):
        read_records(root)
    (root / "meta.json").unlink()
    with pytest.raises(DataError, match=r"must contain meta.json"):
        read_records(root)
    with pytest.raises(DataError, match=r"must be a directory"):
        read_records(tmp_path / "absent")
    shutil.rmtree(root)
