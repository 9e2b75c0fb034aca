"""DP-specific trainable sets and the cached-feature head used by the utility table."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from secfed.data import load_dataset
from secfed.errors import ModelError
from secfed.models import adapter_layout, get_flat, set_flat
from secfed.models.features import FeatureDataset, feature_classifier, tower_features
from secfed.models.scopes import TRAINABLE_SCOPES, select_trainable
from secfed.training import DPConfig, collate_examples, train_local


@pytest.fixture(scope="module")
def perturbed(model_bundle):
    """The tiny classifier with every adapter weight moved off its initial value."""
    model = copy.deepcopy(model_bundle[0])
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model


@pytest.fixture(scope="module")
def test_set(federation, model_bundle):
    return load_dataset(federation.test_dir, model_dir=model_bundle[1])


def test_scopes_nest_and_count_their_parameters(perturbed):
    model = copy.deepcopy(perturbed)
    sizes = {s: select_trainable(model, s) for s in TRAINABLE_SCOPES}
    assert sizes["adapter"] > sizes["top"] > sizes["head"] > sizes["classifier"] > 0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("head.") for n in trainable)
    assert sizes["classifier"] == sum(p.numel() for p in model.head.parameters())
    select_trainable(model, "top")
    lora = [n for n, p in model.named_parameters() if p.requires_grad and ".lora_" in n]
    assert any(n.startswith("text_tower.") for n in lora)
    assert any(n.startswith("image_tower.") for n in lora)
    last = {t: max(int(n.split(".layer")[1].split(".")[1]) for n, _ in model.named_parameters()
                   if n.startswith(t) and ".lora_" in n) for t in ("text_tower", "image_tower")}
    for n in lora:
        tower = n.split(".", 1)[0]
        assert f".{last[tower]}." in n
    select_trainable(model, "adapter")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, p in perturbed.named_parameters() if p.requires_grad}
    with pytest.raises(ModelError, match="trainable scope"):
        select_trainable(model, "everything")


def test_feature_head_gives_the_models_logits_and_gradients(perturbed, test_set):
    model = copy.deepcopy(perturbed).eval()
    select_trainable(model, "head")
    features = tower_features(model, test_set, batch_size=16)
    cached = FeatureDataset(features)
    head = feature_classifier(model).eval()
    assert adapter_layout(head) == adapter_layout(model)
    idx = list(range(len(test_set)))
    full_batch = collate_examples([test_set[i] for i in idx])
    head_batch = collate_examples([cached[i] for i in idx])
    labels = full_batch.pop("labels")
    assert torch.equal(labels, head_batch.pop("labels"))
    full_logits = model(**full_batch)
    head_logits = head(**head_batch)
    torch.testing.assert_close(head_logits, full_logits, rtol=1e-5, atol=1e-5)
    F.cross_entropy(full_logits, labels).backward()
    F.cross_entropy(head_logits, labels).backward()
    full_grads = dict(model.named_parameters())
    for name, p in head.named_parameters():
        torch.testing.assert_close(p.grad, full_grads[name].grad, rtol=1e-4, atol=1e-6)


def test_dp_sgd_trains_the_cached_head_and_the_delta_moves_back(perturbed, test_set):
    model = copy.deepcopy(perturbed).eval()
    select_trainable(model, "classifier")
    cached = FeatureDataset(tower_features(model, test_set))
    head = feature_classifier(model)
    select_trainable(head, "classifier")
    layout = adapter_layout(head)
    assert layout == adapter_layout(model)
    start = get_flat(head, layout)
    config = DPConfig(noise_multiplier=1.0, sample_rate=0.5, local_steps=3, learning_rate=0.01)
    result = train_local(head, cached, config=config)
    assert result.delta.shape == start.shape and abs(result.delta).max() > 0
    set_flat(model, layout, start + result.delta)
    sub = cached.subset([0, 2, 4])
    batch = collate_examples([sub[i] for i in range(3)])
    batch.pop("labels")
    full = collate_examples([test_set[i] for i in (0, 2, 4)])
    full.pop("labels")
    with torch.no_grad():
        torch.testing.assert_close(head.eval()(**batch), model(**full), rtol=1e-5, atol=1e-5)


def test_tower_features_show_progress_per_record(perturbed, test_set, monkeypatch):
    """Computing features (minutes at the demo's scale) shows progress: plain lines on stderr,
    counted in records, with the label the caller gives."""
    import io

    from secfed import progress

    monkeypatch.delenv(progress.ENV, raising=False)
    out = io.StringIO()
    progress.configure("plain", stream=out)
    try:
        tower_features(copy.deepcopy(perturbed), test_set, batch_size=4, label="features (test)")
    finally:
        progress.configure("auto")
    lines = out.getvalue().splitlines()
    n = len(test_set)
    assert lines[0] == f"secfed: features (test) ({n}): started"
    assert lines[-1].startswith(f"secfed: features (test): done, {n}/{n} in ")
    assert len(lines) >= 3  # at least one line in between (batches of 4)
