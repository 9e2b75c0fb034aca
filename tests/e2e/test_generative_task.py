"""``secfed demo prepare --task generative``: the generative city-safety task end to end at tiny
scale -- instruction records, the stand-in foundation model pre-trained here, LoRA-ready model
directory, DP-SGD on a site's records, greedy answers scored field by field."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from secfed.cli.main import cli


@pytest.mark.slow  # pre-trains a small causal LM (~20-60 s on 2 busy cores)
def test_prepare_generative_builds_data_and_a_model_sites_can_train(tmp_path) -> None:
    from secfed.data.instructions import load_instruction_dataset
    from secfed.models import adapter_layout, get_flat, load_model
    from secfed.tasks.citysafety.generative import answer_accuracy
    from secfed.training import DPConfig, evaluate, train_local

    result = CliRunner().invoke(cli, ["demo", "prepare", "--out", str(tmp_path), "--scale",
                                      "tiny", "--task", "generative", "--json"])
    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)
    model_dir = body["model"]
    model, info = load_model(model_dir)
    assert info.task == "causal-lm" and any("q_proj" in t for t in info.targets)
    layout = adapter_layout(model)
    before = get_flat(model, layout)
    fed = json.loads((tmp_path / "data-generative" / "federation.json").read_text())
    for name in fed["enterprises"]:
        data = load_instruction_dataset(tmp_path / "data-generative" / name, model_dir=model_dir)
        assert data.stats.truncated == 0 and data.stats.without_target == 0
    site = load_instruction_dataset(tmp_path / "data-generative" / "city_operations",
                                    model_dir=model_dir)
    out = train_local(model, site, config=DPConfig(noise_multiplier=1.0, sample_rate=0.2,
                                                   local_steps=2, learning_rate=0.01,
                                                   optimizer="adam"))
    assert out.steps == 2 and out.delta.shape == before.shape
    test_dir = tmp_path / "data-generative" / "test"
    records = [json.loads(x) for x in (test_dir / "records.jsonl").read_text().splitlines()]
    scores = answer_accuracy(model, info.tokenizer, records[:8])
    assert set(scores) == {"hazard", "priority", "action", "fields", "exact"}
    assert all(0.0 <= v <= 1.0 for v in scores.values())
    ppl = evaluate(model, load_instruction_dataset(test_dir, model_dir=model_dir))["perplexity"]
    assert 1.0 < ppl < info.tokenizer.vocab_size  # pre-training taught it something
    again = CliRunner().invoke(cli, ["demo", "prepare", "--out", str(tmp_path), "--scale",
                                     "tiny", "--task", "generative", "--json"])
    assert again.exit_code == 0 and json.loads(again.stdout) == body  # built once, reused
