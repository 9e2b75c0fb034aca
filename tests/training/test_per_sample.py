"""The fused DP-SGD path against independent references: flat per-example gradients against
one-example-at-a-time autograd, the flat clipped sum against a float64 reference, and the flat
noise's scale and source."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn
from training_items import make_items

from secfed.errors import DPGuardError, ModelError
from secfed.models import adapter_layout, set_flat
from secfed.training import collate_examples
from secfed.training.dp_optimizer import FlatDPOptimizer, flat_gaussian_noise
from secfed.training.grad_sample import FlatPerSampleGradients


def _named_trainable(model):
    params = dict(model.named_parameters())
    return [(e.name, params[e.name]) for e in adapter_layout(model).entries]


def _reference(model, named, inputs, labels):
    """Per-example gradients, one example at a time, flat in ``named`` order (float64)."""
    rows = []
    for i in range(labels.shape[0]):
        one = {k: v[i:i + 1] for k, v in inputs.items()}
        loss = F.cross_entropy(model(**one), labels[i:i + 1])
        grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
        rows.append(torch.cat([
            (g if g is not None else torch.zeros_like(p)).reshape(-1)
            for g, (_, p) in zip(grads, named, strict=True)
        ]).double())
    return torch.stack(rows).numpy()


def _flat(model, named, inputs, labels):
    sampler = FlatPerSampleGradients(model, named)
    try:
        sampler.start()
        per_example = F.cross_entropy(model(**inputs), labels, reduction="none")
        return sampler.compute(per_example).double().numpy()
    finally:
        sampler.close()


@pytest.mark.parametrize("kind", ["text", "image", "fusion"])
def test_flat_per_example_grads_equal_one_at_a_time(kind, build):
    model = build(kind)
    model.eval()  # deterministic forward for the comparison (the sampler ignores the mode)
    layout = adapter_layout(model)
    set_flat(model, layout, np.random.default_rng(4).standard_normal(layout.total)
             .astype(np.float32) * 0.2)  # LoRA B non-zero, so every block has a gradient
    batch = collate_examples(make_items(model, 7, seed=3, missing=(kind == "fusion")))
    labels = batch.pop("labels")
    named = _named_trainable(model)
    got = _flat(model, named, batch, labels)
    want = _reference(model, named, batch, labels)
    assert got.shape == (7, layout.total)
    assert np.abs(want).max() > 0.01
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)


class Shared(nn.Module):
    """A Linear called twice (sequence and pooled), an Embedding with repeated ids, LayerNorm."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(5, 6)
        self.lin = nn.Linear(6, 6)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 3)

    def forward(self, ids):
        h = self.lin(self.emb(ids))  # [B, T, 6]: 3-D Linear
        h = self.norm(torch.tanh(h)).mean(dim=1)
        return self.head(self.lin(h))  # the same Linear again on [B, 6]


def test_shared_module_embedding_and_layer_norm_sum_their_contributions():
    torch.manual_seed(0)
    model = Shared()
    ids = torch.randint(0, 5, (6, 4))
    ids[0] = 2  # one example repeats an id
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    named = sorted(model.named_parameters())
    got = _flat(model, named, {"ids": ids}, labels)
    want = _reference(model, named, {"ids": ids}, labels)
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-5)


class InPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, x):
        y = self.lin(x)
        y.mul_(2.0)  # the recorded output changes after the hook saw it
        return y


def test_output_modified_in_place_is_refused():
    model = InPlace()
    sampler = FlatPerSampleGradients(model, sorted(model.named_parameters()))
    sampler.start()
    per_example = F.cross_entropy(model(torch.randn(3, 4)), torch.tensor([0, 1, 0]),
                                  reduction="none")
    with pytest.raises(ModelError, match="modified in place"):
        sampler.compute(per_example)
    sampler.close()
    assert not model.lin._forward_hooks


class InPlaceInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, x):
        h = x * 1.0
        y = self.lin(h)
        h.add_(1.0)  # the recorded activation changes after the hook saw it
        return y + h[:, :2]


class WithBatchNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.BatchNorm1d(4)
        self.lin = nn.Linear(4, 2)
        self.norm.requires_grad_(False)  # frozen, yet it still couples the examples

    def forward(self, x):
        return self.lin(self.norm(x))


def test_input_modified_in_place_is_refused():
    model = InPlaceInput()
    sampler = FlatPerSampleGradients(model, sorted(model.named_parameters()))
    sampler.start()
    x = torch.randn(3, 4, requires_grad=True)
    per_example = F.cross_entropy(model(x), torch.tensor([0, 1, 0]), reduction="none")
    with pytest.raises(ModelError, match="modified in place"):
        sampler.compute(per_example)
    sampler.close()


def test_batch_norm_anywhere_is_refused():
    model = WithBatchNorm()
    named = [(n, p) for n, p in sorted(model.named_parameters()) if p.requires_grad]
    with pytest.raises(ModelError, match="mixes the examples"):
        FlatPerSampleGradients(model, named)
    assert not model.lin._forward_hooks


def _optimizer(params, *, sigma, clip, expected, generator=None, secure=True):
    return FlatDPOptimizer(torch.optim.SGD(params, lr=1.0), noise_multiplier=sigma,
                           max_grad_norm=clip, expected_batch_size=expected,
                           loss_reduction="mean", generator=generator, secure_mode=secure)


def test_flat_clipped_sum_matches_a_float64_reference():
    p1, p2 = nn.Parameter(torch.zeros(3, 4)), nn.Parameter(torch.zeros(5))
    opt = _optimizer([p1, p2], sigma=0.0, clip=1.5, expected=2.5)
    flat = torch.randn(9, 17, generator=torch.Generator().manual_seed(1)) * 0.8
    flat[0] *= 0.01  # one far below the clip bound
    norms = np.linalg.norm(flat.double().numpy(), axis=1)
    assert (norms > 1.5).any() and (norms < 1.5).any()
    want = (flat.double().numpy() * np.minimum(1.0, 1.5 / (norms + 1e-6))[:, None]).sum(0) / 2.5
    opt.set_per_sample_grads(flat)
    opt.step()  # lr 1, from zero: parameters = -grad
    got = -np.concatenate([p1.detach().numpy().reshape(-1), p2.detach().numpy()])
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-5)
    assert p1.grad.shape == p1.shape and p2.grad.shape == p2.shape


def test_step_needs_per_example_grads_of_the_adapter_shape():
    p = nn.Parameter(torch.zeros(4))
    opt = _optimizer([p], sigma=1.0, clip=1.0, expected=1.0)
    with pytest.raises(DPGuardError, match="guard per_sample_grads"):
        opt.set_per_sample_grads(torch.zeros(2, 5))
    with pytest.raises(DPGuardError, match="guard per_sample_grads"):
        opt.step()


@pytest.mark.parametrize("secure", [True, False])
def test_flat_noise_has_the_accounted_scale_and_comes_from_the_generator(secure):
    std, d = 0.7, 40_000
    z = flat_gaussian_noise(std, d, generator=torch.Generator().manual_seed(5),
                            secure_mode=secure).double().numpy()
    again = flat_gaussian_noise(std, d, generator=torch.Generator().manual_seed(5),
                                secure_mode=secure)
    assert np.array_equal(z, again.double().numpy())  # the optimizer's generator, nothing else
    low, high = stats.chi2.ppf([0.5e-6, 1 - 0.5e-6], df=d)
    assert low <= float(((z / std) ** 2).sum()) <= high
    assert abs(z.mean()) < 5 * std / np.sqrt(d)
    assert stats.kstest(z / std, "norm").pvalue > 1e-6


def test_noise_only_step_on_an_empty_batch():
    p = nn.Parameter(torch.zeros(2000))
    sigma, clip, expected = 1.2, 0.5, 4.0
    opt = _optimizer([p], sigma=sigma, clip=clip, expected=expected)  # no generator: CSPRNG
    opt.set_per_sample_grads(torch.zeros(0, 2000))
    opt.step()
    z = -p.detach().double().numpy() * expected / (sigma * clip)
    low, high = stats.chi2.ppf([0.5e-6, 1 - 0.5e-6], df=z.size)
    assert low <= float((z**2).sum()) <= high
