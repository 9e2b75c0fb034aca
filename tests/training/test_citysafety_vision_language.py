"""The vision-language variant of the generative city-safety task (issue 16, item 4): records
carry their camera frame, a LLaVA-style model is assembled from the pre-trained causal LM and a
small vision tower, and DP-SGD with LoRA on its language model gets exact per-record gradients
(against one-record-at-a-time autograd) and takes a step. Tiny sizes throughout."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from secfed.data.instructions import load_instruction_dataset
from secfed.errors import ConfigError, ModelError
from secfed.models import adapter_layout, get_flat, load_model, set_flat
from secfed.models.tiny import write_tiny_causal_lm
from secfed.tasks.citysafety.instructions import (
    generate_instruction_federation,
    pretraining_corpus,
)
from secfed.tasks.citysafety.scenes import FRAME_SIZE
from secfed.tasks.citysafety.vision_language import (
    build_vision_language_base,
    prepare_vision_language_model,
)
from secfed.training import DPConfig, collate_examples, train_local
from secfed.training.dp_sgd import per_example_losses
from secfed.training.grad_sample import FlatPerSampleGradients


def _records(path):
    return [json.loads(line) for line in (path / "records.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A tiny pre-trained-shaped causal LM, the VL model assembled from it, VL records."""
    root = tmp_path_factory.mktemp("vl")
    lm = write_tiny_causal_lm(root / "lm", corpus=pretraining_corpus(200, seed=0),
                              vocab_size=360, hidden_size=32, num_layers=1, max_length=160)
    model_dir = prepare_vision_language_model(root / "built", seed=0, size="tiny", lm_base=lm)
    data = generate_instruction_federation(root / "data", seed=1, scale="tiny", vision=True)
    return {"root": root, "lm": lm, "model": model_dir, "data": data}


def test_vision_records_are_the_text_records_plus_their_frame(built, tmp_path) -> None:
    text = generate_instruction_federation(tmp_path / "text", seed=1, scale="tiny")
    vision = built["data"]
    for name in ["city_operations", "test"]:
        a, b = _records(text.root / name), _records(vision.root / name)
        assert [{k: r[k] for k in ("id", "prompt", "completion")} for r in b] == a
        for r in b[:20]:
            assert r["image"] == f"images/{r['id']}.png"
            with Image.open(vision.root / name / r["image"]) as img:
                assert img.size == (FRAME_SIZE, FRAME_SIZE) and img.mode == "RGB"
    assert all("image" not in r for r in _records(text.root / "city_operations"))
    fed = json.loads((vision.root / "federation.json").read_text())
    assert fed["vision"] is True


def test_the_assembled_model_keeps_the_language_model_and_sees_the_frame(built) -> None:
    from transformers import AutoModelForCausalLM, LlavaForConditionalGeneration

    model, info = load_model(built["model"])
    assert info.task == "vision-language" and info.image_tokens == 9
    assert info.targets and all("language_model" in t for t in info.targets)
    lm = AutoModelForCausalLM.from_pretrained(str(built["lm"]), local_files_only=True)
    base = LlavaForConditionalGeneration.from_pretrained(
        str(built["root"] / "built" / "base"), local_files_only=True)
    inner = base.model.language_model.state_dict()
    for name, value in lm.model.state_dict().items():  # the LM's weights, copied unchanged
        assert torch.equal(inner[name], value), name
    assert torch.equal(base.lm_head.weight, lm.lm_head.weight)
    ds = load_instruction_dataset(built["data"].root / "city_operations", model_dir=built["model"])
    assert ds.stats.truncated == 0 and ds.stats.without_target == 0
    batch = collate_examples([ds[i] for i in range(4)])
    model.eval()
    with torch.no_grad():
        loss = per_example_losses(model, batch)
        swapped = per_example_losses(model, {**batch, "pixel_values": torch.flip(
            batch["pixel_values"], dims=[0])})
    assert not torch.allclose(loss, swapped)  # the frame reaches the answer's loss


def test_dp_lora_step_on_vision_language_records_has_exact_per_record_grads(built) -> None:
    model, _ = load_model(built["model"])
    ds = load_instruction_dataset(built["data"].root / "city_operations", model_dir=built["model"])
    items = [ds[i] for i in range(5)]
    assert len({int(it["attention_mask"].sum()) for it in items}) > 1  # ragged rows: trimming
    layout = adapter_layout(model)
    set_flat(model, layout, (np.random.default_rng(3).standard_normal(layout.total)
                             * 0.3).astype(np.float32))  # LoRA B non-zero: A gets gradients
    model.eval()
    params = dict(model.named_parameters())
    sampler = FlatPerSampleGradients(model, [(e.name, params[e.name]) for e in layout.entries])
    try:
        sampler.start()
        got = sampler.compute(per_example_losses(model, collate_examples(items))).double()
    finally:
        sampler.close()
    want = []
    for item in items:  # one record at a time through plain autograd
        loss = per_example_losses(model, collate_examples([item]))[0]
        grads = torch.autograd.grad(loss, [params[e.name] for e in layout.entries])
        want.append(torch.cat([g.reshape(-1) for g in grads]).double())
    want_t = torch.stack(want)
    scale = float(want_t.abs().max())
    assert scale > 1e-3
    np.testing.assert_allclose(got.numpy() / scale, want_t.numpy() / scale, atol=1e-5, rtol=0)
    before = get_flat(model, layout)
    out = train_local(model, ds, config=DPConfig(noise_multiplier=1.0, sample_rate=0.05,
                                                 local_steps=1, learning_rate=0.01,
                                                 optimizer="adam"))
    assert out.steps == 1 and np.isfinite(out.delta).all() and np.abs(out.delta).max() > 0
    np.testing.assert_array_equal(get_flat(model, layout), before + out.delta)


def test_assembly_refusals(built, tmp_path) -> None:
    with pytest.raises(ModelError, match="size"):
        build_vision_language_base(built["lm"], tmp_path / "a", size="huge")
    with pytest.raises(ModelError, match="empty"):
        build_vision_language_base(built["lm"], built["root"], size="tiny")
    with pytest.raises(ModelError, match="causal LM"):
        build_vision_language_base(tmp_path, tmp_path / "b", size="tiny")


def test_vision_needs_the_generative_task(tmp_path) -> None:
    from secfed.demo import prepare_demo

    with pytest.raises(ConfigError, match="vision"):
        prepare_demo(tmp_path, task="classify", vision=True)


def test_answers_are_generated_from_report_and_frame(built) -> None:
    from secfed.tasks.citysafety.generative import answer_accuracy, generate_answers

    model, info = load_model(built["model"])
    test_dir = built["data"].root / "test"
    records = _records(test_dir)[:6]
    frames = load_instruction_dataset(test_dir, model_dir=built["model"]).pixel_values[:6]
    image = (info.image_token_id, info.image_tokens)
    scores = answer_accuracy(model, info.tokenizer, records, pixel_values=frames, image=image)
    assert set(scores) == {"hazard", "priority", "action", "fields", "exact"}
    assert all(0.0 <= v <= 1.0 for v in scores.values())
    with pytest.raises(ModelError, match="pixel_values"):
        generate_answers(model, info.tokenizer, [r["prompt"] for r in records],
                         pixel_values=frames[:2], image=image)
    with pytest.raises(ModelError, match="pixel_values"):
        generate_answers(model, info.tokenizer, [r["prompt"] for r in records], image=image)
