"""DP-SGD on LoRA classifiers: the clipped-sum identity (#820 trap), normalisation, noise scale,
empty Poisson batches, and the model left at global + delta."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from training_items import RecordingDataset, make_items

from secfed.models import adapter_layout, get_flat, set_flat
from secfed.training import DPConfig, collate_examples, evaluate, train_local


def _randomise_adapter(model, seed, scale=0.2):
    layout = adapter_layout(model)
    vec = np.random.default_rng(seed).standard_normal(layout.total).astype(np.float32) * scale
    set_flat(model, layout, vec)
    return layout, vec


def _per_example_grads(model, layout, items):
    """grad of cross_entropy(logits_i, y_i), one example at a time, flat in layout order."""
    params = dict(model.named_parameters())
    model.train()
    grads = []
    for item in items:
        batch = collate_examples([item])
        labels = batch.pop("labels")
        model.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(**batch), labels)
        loss.backward()
        grads.append(np.concatenate([
            params[e.name].grad.detach().reshape(-1).numpy().astype(np.float64)
            for e in layout.entries
        ]))
    model.zero_grad(set_to_none=True)
    return np.stack(grads)


@pytest.mark.parametrize("kind", ["text", "image", "fusion"])
def test_zero_noise_update_is_minus_clipped_sum_over_expected_batch(kind, build):
    """Opacus #820 trap: with sigma = 0, lr = 1, plain SGD, one step, the update must be
    -(sum_i clip_C(g_i)) / (q N), g_i computed independently one example at a time."""
    model = build(kind)
    layout, start = _randomise_adapter(model, seed=5)
    n, q = 10, 0.5
    data = RecordingDataset(make_items(model, n, seed=1, missing=(kind == "fusion")))
    grads = _per_example_grads(model, layout, data.items)
    norms = np.linalg.norm(grads, axis=1)
    clip = float(np.median(norms))
    config = DPConfig(noise_multiplier=0.0, allow_zero_noise=True, sample_rate=q, local_steps=1,
                      max_grad_norm=clip, learning_rate=1.0, optimizer="sgd")
    data.reads.clear()
    result = train_local(model, data, config=config, seed=3)
    batch = sorted(set(data.reads))
    assert result.batch_sizes == (len(batch),) and len(batch) > 0
    assert len(batch) != q * n  # so dividing by the realised size would fail this test
    assert (norms[batch] > clip).any() and (norms[batch] < clip).any()
    clipped = grads[batch] * np.minimum(1.0, clip / norms[batch])[:, None]
    expected = -clipped.sum(axis=0) / (q * n)
    assert result.expected_batch_size == q * n
    np.testing.assert_allclose(result.delta, expected, atol=1e-5, rtol=0)
    assert np.array_equal(get_flat(model, layout), start + result.delta)


def test_empty_batches_step_with_noise_of_the_accounted_scale(build):
    """Only empty Poisson batches: every step is pure noise N(0, (sigma C)^2) / (q N), so
    delta * q N / (lr sigma C sqrt(T)) must be standard normal per coordinate."""
    model = build("text")
    layout, _ = _randomise_adapter(model, seed=2)
    n, q, steps, sigma, clip, lr = 3, 1e-4, 4, 1.3, 0.7, 0.01
    data = RecordingDataset(make_items(model, n))
    config = DPConfig(noise_multiplier=sigma, sample_rate=q, local_steps=steps,
                      max_grad_norm=clip, learning_rate=lr)
    result = train_local(model, data, config=config, seed=11)
    assert result.batch_sizes == (0,) * steps and data.reads == []
    assert result.steps == steps and np.isnan(result.mean_loss)
    z = result.delta.astype(np.float64) * (q * n) / (lr * sigma * clip * np.sqrt(steps))
    d = z.size
    # chi-square interval for the sum of squares, two-sided 1e-6
    low, high = stats.chi2.ppf([0.5e-6, 1 - 0.5e-6], df=d)
    assert low <= float((z**2).sum()) <= high
    assert abs(z.mean()) < 5 / np.sqrt(d)


def test_training_learns_and_evaluate_reports(build):
    torch.manual_seed(0)
    model = build("fusion", num_classes=3)
    train = make_items(model, 96, seed=2, missing=True)
    test = make_items(model, 48, seed=9, missing=True)
    before = evaluate(model, test)
    config = DPConfig(noise_multiplier=0.5, sample_rate=0.25, local_steps=40, max_grad_norm=1.0,
                      learning_rate=0.5)
    result = train_local(model, train, config=config)
    after = evaluate(model, test)
    assert before["n"] == after["n"] == 48
    assert after["loss"] < before["loss"]
    assert after["accuracy"] >= 0.8
    assert result.delta.dtype == np.float32 and result.delta.shape == (result.layout.total,)
    assert 0 < result.delta_norm <= result.delta_norm_bound
    assert model.training is True  # restored
    assert not any(m._forward_hooks for m in model.modules())  # hooks cleaned up
    assert not any(hasattr(p, "summed_grad") for p in model.parameters())


def test_adam_runs_within_its_bound(build):
    model = build("image")
    data = make_items(model, 16)
    # q = 0.3: not 1/k, which PrivacyEngine.make_private could not express (q = 1/len(loader))
    config = DPConfig(noise_multiplier=1.0, sample_rate=0.3, local_steps=3, optimizer="adam",
                      learning_rate=0.01)
    result = train_local(model, data, config=config)
    assert result.sample_rate == 0.3 and result.expected_batch_size == pytest.approx(0.3 * 16)
    assert 0 < result.delta_norm <= result.delta_norm_bound
    # Adam moves each coordinate by about lr per step: the delta is far from zero
    assert result.delta_norm > 0.01 * np.sqrt(result.layout.total)


@pytest.mark.parametrize("kind", ["text", "fusion"])
def test_lora_dropout_and_repeated_rounds_on_one_model(kind, build):
    """LoRA dropout is active in train(); a second round on the same model re-attaches hooks."""
    from secfed.models import LoraSettings

    model = build(kind, lora=LoraSettings(rank=4, alpha=8.0, dropout=0.1))
    assert any(isinstance(m, torch.nn.Dropout) and m.p == 0.1 for m in model.modules())
    data = make_items(model, 12, missing=(kind == "fusion"))
    config = DPConfig(noise_multiplier=1.0, sample_rate=0.5, local_steps=2, learning_rate=0.05)
    first = train_local(model, data, config=config)
    second = train_local(model, data, config=config)
    assert first.layout == second.layout
    assert 0 < second.delta_norm <= second.delta_norm_bound


def test_seed_fixes_sampling_but_never_the_noise(build):
    """A test seed reproduces Poisson sampling and dropout; the DP noise stays unpredictable."""
    runs = {}
    for sigma in (0.0, 1.0):
        deltas = []
        for _ in range(2):
            model = build("text")
            data = RecordingDataset(make_items(model, 12))
            config = DPConfig(noise_multiplier=sigma, allow_zero_noise=True, sample_rate=0.5,
                              local_steps=2, learning_rate=0.1)
            deltas.append((train_local(model, data, config=config, seed=7).delta, data.reads))
        runs[sigma] = deltas
    (a, reads_a), (b, reads_b) = runs[0.0]
    assert reads_a == reads_b and np.array_equal(a, b)
    (a, reads_a), (b, reads_b) = runs[1.0]
    assert reads_a == reads_b and not np.array_equal(a, b)
