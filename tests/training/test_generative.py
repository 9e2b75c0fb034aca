"""DP-SGD on generative and bring-your-own models (issue 16): per-example gradients of LoRA on
``[batch, tokens, features]`` activations against one-record-at-a-time autograd, for every
architecture ``secfed model init`` supports; the #820 clipped-sum identity for a causal LM; the
sampler and normalisation guards; the completion-only loss and the instruction data format."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, WeightedRandomSampler
from training_items import RecordingDataset

from secfed.errors import DataError, DPGuardError, ModelError
from secfed.models import adapter_layout, get_flat, init_model, load_model, set_flat
from secfed.models.generative import IGNORE_INDEX
from secfed.models.tiny import (
    write_tiny_causal_lm,
    write_tiny_image_tower,
    write_tiny_llava,
    write_tiny_text_tower,
)
from secfed.training import DPConfig, collate_examples, evaluate, train_local
from secfed.training.dp_sgd import per_example_losses
from secfed.training.grad_sample import FlatPerSampleGradients

PROMPTS = [
    ("Report: smoke near the depot.\nAnswer:", " hazard=fire_smoke priority=high"),
    ("Water under the bridge.\nAnswer:", " hazard=flooding"),
    ("Cracked beam, level two of the garage, people nearby.\nAnswer:", " hazard=structural"),
    ("A", " short"),
    ("Fence cut at the north gate last night.\nAnswer:", " hazard=intrusion priority=medium"),
]


def _write_records(root, records):
    root.mkdir(parents=True, exist_ok=True)
    (root / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


def _prompt_records(n, *, image=False):
    out = []
    for i in range(n):
        p, c = PROMPTS[i % len(PROMPTS)]
        rec = {"id": f"r{i}", "prompt": f"{p} ({i})", "completion": c}
        if image:
            rec["image"] = f"images/{i % 3}.png"
        out.append(rec)
    return out


def _write_images(root, size=16):
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for k in range(3):
        Image.fromarray(rng.integers(0, 256, (size + 3, size + 1, 3), dtype=np.uint8)).save(
            root / "images" / f"{k}.png")


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """Tiny checkpoints of every family, written once."""
    root = tmp_path_factory.mktemp("byom")
    out = {arch: write_tiny_causal_lm(root / arch, arch=arch)
           for arch in ("llama", "qwen2", "gpt2")}
    out["llava"] = write_tiny_llava(root / "llava")
    out["bert"] = write_tiny_text_tower(root / "bert")
    out["vit"] = write_tiny_image_tower(root / "vit")
    return out


def _generative(checkpoints, tmp_path, arch, *, max_length=48, **kw):
    task = "vision-language" if arch == "llava" else "causal-lm"
    init_model(checkpoints[arch], task=task, out=tmp_path / f"model-{arch}",
               max_length=max_length, **kw)
    return tmp_path / f"model-{arch}"


def _dataset(model_dir, data_dir):
    from secfed.data.instructions import load_instruction_dataset

    return load_instruction_dataset(data_dir, model_dir=model_dir)


def _randomise(model, seed=4, scale=0.3):
    layout = adapter_layout(model)
    set_flat(model, layout, (np.random.default_rng(seed).standard_normal(layout.total)
                             * scale).astype(np.float32))  # LoRA B non-zero: every block moves
    return layout


def _reference(model, layout, items):
    """Per-record gradients, one record at a time through plain autograd (float64 rows)."""
    params = dict(model.named_parameters())
    rows = []
    for item in items:
        loss = per_example_losses(model, collate_examples([item]))[0]
        grads = torch.autograd.grad(loss, [params[e.name] for e in layout.entries],
                                    allow_unused=True)
        rows.append(torch.cat([(g if g is not None else torch.zeros_like(params[e.name]))
                               .reshape(-1) for g, e in zip(grads, layout.entries, strict=True)])
                    .double())
    return torch.stack(rows).numpy()


def _flat(model, layout, items):
    params = dict(model.named_parameters())
    sampler = FlatPerSampleGradients(model, [(e.name, params[e.name]) for e in layout.entries])
    try:
        sampler.start()
        return sampler.compute(per_example_losses(model, collate_examples(items))).double().numpy()
    finally:
        sampler.close()


def _classifier_items(model, info, n):
    """Records for a seq-cls / image-cls model, built from its tokenizer / image size."""
    rng = np.random.default_rng(1)
    items = []
    for i in range(n):
        item = {"labels": torch.tensor(i % 2)}
        if info.tokenizer is not None:
            enc = info.tokenizer("the road is broken near the park"[: 8 + 3 * i],
                                 padding="max_length", truncation=True,
                                 max_length=info.max_text_length, return_tensors="pt")
            item["input_ids"] = enc["input_ids"][0]
            item["attention_mask"] = enc["attention_mask"][0]
        if info.image_size is not None:
            item["pixel_values"] = torch.from_numpy(
                rng.standard_normal((3, info.image_size, info.image_size)).astype(np.float32))
        items.append(item)
    return items


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "llava", "bert", "vit"])
def test_per_example_grads_equal_one_record_at_a_time(arch, checkpoints, tmp_path):
    """The fast path (forward hooks, one autograd.grad, closed-form LoRA grads on [B, T, F])
    equals plain autograd one record at a time, to 1e-5, for every supported family."""
    if arch in ("bert", "vit"):
        task = "seq-cls" if arch == "bert" else "image-cls"
        init_model(checkpoints[arch], task=task, out=tmp_path / "m", labels=["a", "b"])
        model, info = load_model(tmp_path / "m")
        items = _classifier_items(model, info, 5)
    else:
        model_dir = _generative(checkpoints, tmp_path, arch)
        model, _ = load_model(model_dir)
        data = _write_records(tmp_path / "data", _prompt_records(5, image=arch == "llava"))
        if arch == "llava":
            _write_images(data)
        items = [_dataset(model_dir, data)[i] for i in range(5)]
        lengths = [int(it["attention_mask"].sum()) for it in items]
        assert len(set(lengths)) > 2  # ragged rows: the trimming and padding are exercised
    model.eval()
    layout = _randomise(model)
    got = _flat(model, layout, items)
    want = _reference(model, layout, items)
    assert got.shape == (5, layout.total)
    assert np.abs(want).max() > 1e-3
    scale = np.abs(want).max()
    np.testing.assert_allclose(got / scale, want / scale, atol=1e-5, rtol=0)


def test_gpt2_conv1d_trainable_weight_gets_per_example_grads():
    """A trainable GPT-2 Conv1D (weight stored [in, out]) on [B, T, F] activations."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(5, 4)  # nf=5 outputs, nx=4 inputs
    x = torch.randn(3, 6, 4)
    target = torch.randn(3, 6, 5)
    named = list(conv.named_parameters())
    sampler = FlatPerSampleGradients(conv, named)
    sampler.start()
    losses = ((conv(x) - target) ** 2).sum(dim=(1, 2))
    got = sampler.compute(losses).numpy()
    sampler.close()
    for i in range(3):
        loss = ((conv(x[i:i + 1]) - target[i:i + 1]) ** 2).sum()
        grads = torch.autograd.grad(loss, [p for _, p in named])
        want = torch.cat([g.reshape(-1) for g in grads]).numpy()
        np.testing.assert_allclose(got[i], want, atol=1e-5, rtol=1e-5)


def test_zero_noise_update_is_minus_clipped_sum_over_expected_batch(checkpoints, tmp_path):
    """Opacus #820 trap for a causal LM: with sigma = 0, lr = 1, plain SGD and one step, the
    update is -(sum_i clip_C(g_i)) / (q N), each g_i computed on its own record."""
    model_dir = _generative(checkpoints, tmp_path, "llama", max_length=128)
    model, _ = load_model(model_dir)
    layout = _randomise(model, seed=5)
    start = get_flat(model, layout)
    n, q = 10, 0.5
    data = RecordingDataset([_dataset(model_dir, _write_records(
        tmp_path / "data", _prompt_records(n)))[i] for i in range(n)])
    model.train()
    grads = _reference(model, layout, data.items)
    norms = np.linalg.norm(grads, axis=1)
    assert (norms > 0).all()  # every record has target tokens within max_length
    clip = float(np.median(norms))
    config = DPConfig(noise_multiplier=0.0, allow_zero_noise=True, sample_rate=q, local_steps=1,
                      max_grad_norm=clip, learning_rate=1.0, optimizer="sgd")
    data.reads.clear()
    result = train_local(model, data, config=config, seed=3)
    batch = sorted(set(data.reads))
    assert result.batch_sizes == (len(batch),) and len(batch) > 0
    assert len(batch) != q * n  # dividing by the realised batch size would fail
    assert (norms[batch] > clip).any() and (norms[batch] < clip).any()
    clipped = grads[batch] * np.minimum(1.0, clip / norms[batch])[:, None]
    expected = -clipped.sum(axis=0) / (q * n)
    np.testing.assert_allclose(result.delta, expected, atol=1e-5, rtol=0)
    assert np.array_equal(get_flat(model, layout), start + result.delta)


def test_guards_hold_for_a_causal_lm(checkpoints, tmp_path):
    """The sampler guard (#813) and the missing-per-sample-gradient guard (#820) for a causal
    LM, as for classifiers."""
    model_dir = _generative(checkpoints, tmp_path, "gpt2")
    model, _ = load_model(model_dir)
    items = _dataset(model_dir, _write_records(tmp_path / "data", _prompt_records(8)))
    config = DPConfig(noise_multiplier=1.0, sample_rate=0.25, local_steps=2)
    loader = DataLoader(items, batch_size=2, collate_fn=collate_examples,
                        sampler=WeightedRandomSampler(torch.ones(len(items)), num_samples=8))
    with pytest.raises(DPGuardError, match="guard sampler"):
        train_local(model, items, config=config, data_loader=loader)

    class SideChannel(nn.Module):  # a trainable bias used outside any module call
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.bias = nn.Linear(1, 1)

        def per_example_loss(self, batch):
            loss = self.inner.per_example_loss(batch)
            return loss + torch.nn.functional.linear(torch.ones(len(loss), 1), self.bias.weight,
                                                     self.bias.bias)[:, 0]

    with pytest.raises(DPGuardError, match=r"guard per_sample_grads:.*bias"):
        train_local(SideChannel(model), items, config=config, seed=1)


def test_training_lowers_the_completion_loss_and_evaluate_reports_perplexity(checkpoints,
                                                                             tmp_path):
    model_dir = _generative(checkpoints, tmp_path, "qwen2")
    model, _ = load_model(model_dir)
    items = _dataset(model_dir, _write_records(tmp_path / "data", _prompt_records(40)))
    before = evaluate(model, items)
    config = DPConfig(noise_multiplier=0.3, sample_rate=0.25, local_steps=30,
                      learning_rate=0.02, optimizer="adam", max_grad_norm=1.0)
    result = train_local(model, items, config=config, seed=0)
    after = evaluate(model, items)
    # a random-init LM with LoRA on q/v only: a small but clear drop (noise alone raises it)
    assert after["loss"] < before["loss"] - 0.05, (before, after)
    assert after["perplexity"] == pytest.approx(np.exp(after["loss"]))
    assert after["tokens"] == int((items.labels != IGNORE_INDEX)[:, 1:].sum())
    assert result.steps == 30


def test_loss_counts_completion_and_assistant_tokens_only(checkpoints, tmp_path):
    model_dir = _generative(checkpoints, tmp_path, "llama", max_length=64)
    records = [
        {"prompt": "Report: smoke.\nAnswer:", "completion": " fire"},
        {"messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": "water?"},
                      {"role": "assistant", "content": "flooding"},
                      {"role": "user", "content": "and now?"},
                      {"role": "assistant", "content": "pumps"}]},
    ]
    ds = _dataset(model_dir, _write_records(tmp_path / "data", records))
    tok = ds.records and load_model(model_dir)[1].tokenizer
    ids, labels = ds.input_ids[0], ds.labels[0]
    n = int(ds.attention_mask[0].sum())
    target = tok.decode(ids[:n][labels[:n] != IGNORE_INDEX])
    assert target == " fire" + tok.eos_token
    ids, labels = ds.input_ids[1], ds.labels[1]
    n = int(ds.attention_mask[1].sum())
    target = tok.decode(ids[:n][labels[:n] != IGNORE_INDEX])
    assert "flooding" in target and "pumps" in target
    for word in ("Be brief", "water?", "and now?", "<|user|>"):
        assert word not in target
    assert (labels[n:] == IGNORE_INDEX).all()  # padding never counts
    assert ds.stats.truncated == 0 and ds.stats.without_target == 0


def test_truncation_is_counted_and_records_are_never_packed(checkpoints, tmp_path):
    model_dir = _generative(checkpoints, tmp_path, "llama", max_length=12)
    records = [{"prompt": "x " * 40, "completion": " y"},  # prompt alone overflows
               {"prompt": "a", "completion": " bb cc dd ee ff gg hh ii jj kk"},  # cut completion
               {"prompt": "a", "completion": " b"}]
    ds = _dataset(model_dir, _write_records(tmp_path / "data", records))
    assert len(ds) == 3  # one row per record
    assert ds.stats.truncated == 2 and ds.stats.without_target == 1
    assert (ds.attention_mask.sum(dim=1) <= 12).all()
    assert (ds.labels[0] == IGNORE_INDEX).all()


@pytest.mark.parametrize(("line", "match"), [
    ('{"prompt": "a"}', "completion"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "assistant"),
    ('{"messages": [{"role": "robot", "content": "hi"}]}', r"messages\[0\]"),
    ('{"prompt": "a", "completion": "b", "label": 1}', "fields must be among"),
    ('{"prompt": "a", "completion": "b", "image": "../x.png"}', "relative path"),
    ("not json", "line 1"),
])
def test_malformed_instruction_records_are_refused(line, match, checkpoints, tmp_path):
    model_dir = _generative(checkpoints, tmp_path, "llama")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "records.jsonl").write_text(line + "\n")
    with pytest.raises(DataError, match=match):
        _dataset(model_dir, tmp_path / "data")


def test_instruction_data_needs_a_generative_model(checkpoints, tmp_path):
    init_model(checkpoints["bert"], task="seq-cls", out=tmp_path / "m", labels=["a", "b"])
    with pytest.raises(ModelError, match="generative"):
        _dataset(tmp_path / "m", _write_records(tmp_path / "data", _prompt_records(2)))


def test_vision_language_records_carry_their_image(checkpoints, tmp_path):
    model_dir = _generative(checkpoints, tmp_path, "llava")
    data = _write_records(tmp_path / "data", _prompt_records(4, image=True))
    _write_images(data)
    ds = _dataset(model_dir, data)
    info = load_model(model_dir)[1]
    assert ds.pixel_values.shape == (4, 3, info.image_size, info.image_size)
    assert int((ds.input_ids[0] == info.image_token_id).sum()) == info.image_tokens
    assert not (ds.labels == info.image_token_id).any()  # image tokens carry no loss
    no_image = _write_records(tmp_path / "bare", _prompt_records(2))
    with pytest.raises(DataError, match="'image' is required"):
        _dataset(model_dir, no_image)


def test_pretraining_epochs_override_the_size_and_are_checked(tmp_path, monkeypatch):
    """``pretrain_base_lm(epochs=N)`` (the benchmarks' pre-training lever) trains N epochs
    instead of the size's own, and refuses N < 1 before writing anything."""
    from secfed.tasks.citysafety import generative
    from secfed.tasks.citysafety.instructions import pretraining_corpus

    small = pretraining_corpus(60, seed=0)
    monkeypatch.setattr(generative, "pretraining_corpus", lambda n, seed: small)
    runs = {}
    for name, epochs in (("default", None), ("one", 1)):
        lines: list[str] = []
        generative.pretrain_base_lm(tmp_path / name, size="tiny", seed=0, log=lines.append,
                                    epochs=epochs)
        runs[name] = [line for line in lines if "pre-training epoch" in line]
    assert len(runs["default"]) == generative.LM_SIZES["tiny"].pretrain_epochs
    assert [line.split(":")[0] for line in runs["one"]] == [
        "language model pre-training epoch 1/1"]
    with pytest.raises(ModelError, match="epochs must be at least 1"):
        generative.pretrain_base_lm(tmp_path / "zero", size="tiny", seed=0, epochs=0)
    assert not (tmp_path / "zero").exists()
