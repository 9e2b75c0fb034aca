"""`secfed demo prepare`: data and model are built once and reused by `demo run`."""

from __future__ import annotations

import json

from click.testing import CliRunner

from secfed.cli.main import cli


def test_demo_prepare_builds_loadable_model_and_data(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(cli, ["demo", "prepare", "--out", str(out), "--scale", "tiny",
                                      "--json"])
    assert result.exit_code == 0, result.output
    paths = json.loads(result.stdout)
    meta = json.loads((out / "model" / "secfed_model.json").read_text())
    assert meta["kind"] == "fusion"
    assert paths["model"] == str(out / "model")
    # the shared held-out set and every enterprise's records are on disk
    assert (out / "data" / "test" / "records.jsonl").stat().st_size > 0
    from secfed.models import load_classifier

    model, info = load_classifier(out / "model")
    assert info.num_classes == meta["num_classes"]
    # a second prepare reuses what exists (nothing rebuilt, same adapter hash)
    again = CliRunner().invoke(cli, ["demo", "prepare", "--out", str(out), "--scale", "tiny"])
    assert again.exit_code == 0, again.output
    assert json.loads((out / "model" / "secfed_model.json").read_text()) == meta
