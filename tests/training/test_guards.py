"""Each DP guardrail trips on the mistake it exists for, with an error naming the check."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from opacus.data_loader import DPDataLoader
from torch import nn
from torch.utils.data import DataLoader, WeightedRandomSampler
from training_items import make_items

from secfed.errors import ConfigError, DPGuardError
from secfed.models import adapter_layout, get_flat
from secfed.models.classifiers import TextClassifier
from secfed.privacy import DPSGDEvent
from secfed.training import DPConfig, collate_examples, make_private_trainer, train_local
from secfed.training.guards import (
    check_accountant_history,
    check_adapter_delta,
    delta_norm_bound,
)

CONFIG = DPConfig(noise_multiplier=1.0, sample_rate=0.25, local_steps=3, learning_rate=0.1)


@pytest.fixture
def text_model(build):
    return build("text")


@pytest.fixture
def items(text_model):
    return make_items(text_model, 16)


def test_weighted_sampler_is_refused(text_model, items):
    """Opacus #813: a weighted sampler makes the real sampling rate unrelated to q."""
    weights = torch.ones(len(items))
    loader = DataLoader(items, batch_size=4, collate_fn=collate_examples,
                        sampler=WeightedRandomSampler(weights, num_samples=len(items)))
    with pytest.raises(DPGuardError, match=r"guard sampler:.*WeightedRandomSampler"):
        train_local(text_model, items, config=CONFIG, data_loader=loader)
    shuffled = DataLoader(items, batch_size=4, shuffle=True)
    with pytest.raises(DPGuardError, match="guard sampler"):
        train_local(text_model, items, config=CONFIG, data_loader=shuffled)


def test_poisson_loader_with_another_rate_is_refused(text_model, items):
    """Opacus' make_private derives q = 1/len(loader): 1/3 here, not the accounted 0.25."""
    loader = DPDataLoader.from_data_loader(DataLoader(items, batch_size=6))
    assert loader.sample_rate == pytest.approx(1 / 3)
    with pytest.raises(DPGuardError, match="guard sample_rate"):
        train_local(text_model, items, config=CONFIG, data_loader=loader)
    exact_q = DPDataLoader(items, sample_rate=0.25)  # right q, but 4 steps instead of 3
    with pytest.raises(DPGuardError, match="guard steps"):
        train_local(text_model, items, config=CONFIG, data_loader=exact_q)


@pytest.mark.parametrize(
    ("charged", "check"),
    [
        (DPSGDEvent(0.8, 0.25, 3), "noise_multiplier"),
        (DPSGDEvent(1.0, 0.2, 3), "sample_rate"),
        (DPSGDEvent(1.0, 0.25, 4), "steps"),
    ],
)
def test_accounted_release_must_match_the_optimizer(text_model, items, charged, check):
    """The ledger's DP-SGD event (secfed.privacy) against what the optimizer and sampler use."""
    with pytest.raises(DPGuardError, match=f"guard accounting: {check}"):
        train_local(text_model, items, config=CONFIG, accounted=charged)
    # the matching release passes
    result = train_local(text_model, items, config=CONFIG, accounted=DPSGDEvent(1.0, 0.25, 3))
    assert result.steps == 3


def test_normalisation_by_anything_but_q_times_n_is_refused(text_model, items):
    """Opacus #819: dividing by another batch size than the accounted q*N."""
    trainer = make_private_trainer(text_model, items, config=CONFIG)
    trainer.optimizer.expected_batch_size = int(len(items) / 3)  # make_private's int(N/len)
    with pytest.raises(DPGuardError, match="guard normalisation"):
        trainer.train()
    trainer.close()


def test_momentum_is_refused(text_model, items):
    trainer = make_private_trainer(text_model, items, config=CONFIG)
    trainer.optimizer.original_optimizer.param_groups[0]["momentum"] = 0.9
    with pytest.raises(DPGuardError, match="guard optimizer"):
        trainer.train()
    trainer.close()


class SideChannelHead(TextClassifier):
    """A trainable layer used outside a module call: Opacus' hooks never see it (the #820
    failure shape: no per-sample gradient, silently wrong DP update)."""

    def __init__(self, base):
        nn.Module.__init__(self)
        self.spec = base.spec
        self.text_tower = base.text_tower
        self.head = base.head
        self.bias_head = nn.Linear(1, base.spec.num_classes)

    def forward(self, **batch):
        logits = super().forward(**batch)
        ones = torch.ones(logits.shape[0], 1)
        return logits + F.linear(ones, self.bias_head.weight, self.bias_head.bias)


def test_missing_per_sample_gradients_are_detected(text_model, items):
    model = SideChannelHead(text_model)
    with pytest.raises(DPGuardError, match=r"guard per_sample_grads:.*bias_head"):
        train_local(model, items, config=CONFIG, seed=1)


class Poisoned(nn.Module):
    """Wraps a classifier and writes into its head during forward (a corrupted update path)."""

    def __init__(self, inner, value):
        super().__init__()
        self.inner = inner
        self.value = value

    def forward(self, **batch):
        with torch.no_grad():
            self.inner.head.bias.add_(self.value)
        return self.inner(**batch)


def test_poisoned_delta_beyond_the_clip_noise_bound_is_refused(text_model, items):
    layout = adapter_layout(text_model)
    before = get_flat(text_model, layout)
    with pytest.raises(DPGuardError, match="guard delta_norm"):
        train_local(Poisoned(text_model, 1e3), items, config=CONFIG, seed=2)
    assert np.array_equal(get_flat(text_model, layout), before)


def test_nan_delta_is_refused(text_model, items):
    layout = adapter_layout(text_model)
    before = get_flat(text_model, layout)
    with pytest.raises(DPGuardError, match="guard delta_finite"):
        train_local(Poisoned(text_model, float("nan")), items, config=CONFIG, seed=2)
    assert np.array_equal(get_flat(text_model, layout), before)  # global adapter put back


def test_update_that_never_reaches_the_adapter_is_refused(text_model, items):
    trainer = make_private_trainer(text_model, items, config=CONFIG)
    trainer.optimizer.original_optimizer.step = lambda closure=None: None
    with pytest.raises(DPGuardError, match="guard delta_nonzero"):
        trainer.train()


def test_accountant_history_and_delta_checks_directly():
    charged = DPSGDEvent(1.0, 0.25, 3)
    check_accountant_history([(1.0, 0.25, 3)], charged)
    with pytest.raises(DPGuardError, match="guard accountant"):
        check_accountant_history([(1.0, 0.25, 2), (1.0, 0.25, 1)], charged)
    bound = delta_norm_bound(config=CONFIG, batch_sizes=[4, 4, 4], dimension=100, dataset_size=16)
    # per step: lr (B C + sigma C (sqrt(d) + 10) + sqrt(d) gamma / 2) / (q N), gamma = 2^-10 the
    # noise grid of sigma C = 1 (each noised coordinate is snapped by at most gamma / 2)
    assert bound == pytest.approx(3 * 0.1 * (4 + 20 + 10 * 2**-10 / 2) / 4, rel=2e-4)
    assert bound > 3 * 0.1 * (4 + 20 + 10 * 2**-10 / 2) / 4
    assert check_adapter_delta(np.full(100, 0.1, np.float32), bound=bound) == pytest.approx(1.0)
    with pytest.raises(DPGuardError, match="guard delta_norm"):
        check_adapter_delta(np.full(100, 1.0, np.float32), bound=bound)


def test_config_refuses_zero_noise_and_bad_values():
    with pytest.raises(ConfigError, match="noise_multiplier must be > 0"):
        DPConfig(noise_multiplier=0.0, sample_rate=0.1, local_steps=1)
    with pytest.raises(ConfigError, match="sample_rate"):
        DPConfig(noise_multiplier=1.0, sample_rate=1.5, local_steps=1)
    with pytest.raises(ConfigError, match="local_steps"):
        DPConfig(noise_multiplier=1.0, sample_rate=0.1, local_steps=0)
    with pytest.raises(ConfigError, match="optimizer"):
        DPConfig(noise_multiplier=1.0, sample_rate=0.1, local_steps=1, optimizer="adagrad")


class BareParameterScale(nn.Module):
    """A trainable bare nn.Parameter: Opacus has no per-sample gradient for it."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, **batch):
        return self.inner(**batch) * self.scale


class ConvHead(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.mix = nn.Conv1d(1, 1, 1)

    def forward(self, **batch):
        return self.mix(self.inner(**batch).unsqueeze(1)).squeeze(1)


@pytest.mark.parametrize("wrapper", [BareParameterScale, ConvHead])
def test_trainable_layers_without_supported_grad_sampler_are_refused(text_model, items, wrapper):
    from secfed.errors import ModelError

    with pytest.raises(ModelError):
        train_local(wrapper(text_model), items, config=CONFIG)
    assert not any(m._forward_hooks for m in text_model.modules())  # nothing left behind
