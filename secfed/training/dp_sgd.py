"""Local DP-SGD on a LoRA classifier with Opacus; returns the adapter delta.

What one step does (and what the accountant is told), with N records, Poisson rate q, clip C,
noise multiplier sigma, learning rate lr:

1. Poisson-sample a batch: each record independently with probability q (Opacus
   ``UniformWithReplacementSampler``, exactly ``local_steps`` draws, empty batches included).
2. Per-example loss l_i = cross_entropy(logits_i, y_i), computed here from the model's logits
   (never Hugging Face's ``labels=`` loss); each per-example gradient is exactly grad l_i
   (gradients of their sum with respect to each trainable layer's output, see below).
3. Clip each to norm C, sum, add N(0, sigma^2 C^2) noise from the OS CSPRNG and round to a
   power-of-two grid finer than sigma C / 1024 (:mod:`secfed.training.noise`: exact sampling, so
   no floating-point low-order bits leak; the rounding is post-processing of the Gaussian
   mechanism the accountant charges), and divide by the *fixed* expected batch size q*N (not the realised one, whose size would itself leak; not Opacus
   ``make_private``'s int(N / len(loader)), which cannot express an arbitrary accounted q).
4. optimizer step: SGD moves by -lr * (sum_i clip(g_i) + z) / (q N).

An empty batch still takes a step (pure noise), as the accounting assumes. Per-example gradients
come from :mod:`secfed.training.grad_sample` (forward hooks, one ``autograd.grad`` of the summed
per-example losses, closed-form per-layer gradients, all in one flat ``[B, D]`` tensor); clipping,
noise and the step are Opacus' ``DPOptimizer`` arithmetic on that tensor
(:mod:`secfed.training.dp_optimizer`); sampling is Opacus' Poisson sampler and accounting an
Opacus RDP accountant hooked to the optimizer. They are assembled here instead of through
``PrivacyEngine.make_private`` because that derives q = 1/len(data_loader), which only matches the
ledger's q when 1/q is an integer.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from secfed.errors import DataError, DPGuardError, ModelError
from secfed.models import AdapterLayout, adapter_layout, get_flat, set_flat
from secfed.training.config import DPConfig
from secfed.training.dp_optimizer import FlatDPOptimizer
from secfed.training.grad_sample import FlatPerSampleGradients
from secfed.training.guards import (
    AccountedRelease,
    check_accountant_history,
    check_accounting,
    check_adapter_delta,
    check_sampler,
    delta_norm_bound,
)

__all__ = [
    "MODEL_INPUT_KEYS",
    "PrivateTrainer",
    "TrainResult",
    "collate_examples",
    "evaluate",
    "make_private_trainer",
    "per_example_losses",
    "train_local",
]

MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "pixel_values", "text_present", "image_present")


@dataclass(frozen=True)
class TrainResult:
    """One round of local DP training.

    ``mean_loss`` is the mean training loss over non-empty steps (NaN if all were empty): a
    local diagnostic computed from raw data, not differentially private; never send it.
    """

    delta: np.ndarray
    layout: AdapterLayout
    steps: int
    sample_rate: float
    noise_multiplier: float
    max_grad_norm: float
    mean_loss: float
    expected_batch_size: float
    batch_sizes: tuple[int, ...]
    delta_norm: float
    delta_norm_bound: float


@dataclass(frozen=True)
class _Accounted:
    noise_multiplier: float
    sample_rate: float
    steps: int


def collate_examples(items: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack dataset items (dicts of tensors with the same keys) into one batch.

    Raises:
        DataError: items with different keys or a non-tensor value.
    """
    keys = set(items[0])
    out: dict[str, torch.Tensor] = {}
    for item in items:
        if set(item) != keys:
            raise DataError(f"dataset items must share their keys (got {sorted(item)} and "
                            f"{sorted(keys)})")
    for key in sorted(keys):
        values = [item[key] for item in items]
        if not all(isinstance(v, torch.Tensor) for v in values):
            raise DataError(f"dataset item field {key!r} must be a tensor")
        out[key] = torch.stack(values)
    return out


def _split(batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    if "labels" not in batch:
        raise DataError("dataset items must carry 'labels' (a long scalar)")
    inputs = {k: v for k, v in batch.items() if k in MODEL_INPUT_KEYS}
    return inputs, batch["labels"].long()


def per_example_losses(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The loss of each record of ``batch``, shape ``[B]``: the model's own
    ``per_example_loss(batch)`` where it has one (generative models: mean NLL of the target
    tokens), else the cross-entropy of its logits ``[B, C]`` against ``labels``.

    Raises:
        ModelError: logits or losses of the wrong shape.
        DataError: ``labels`` missing.
    """
    size = next(iter(batch.values())).shape[0]
    own = getattr(model, "per_example_loss", None)
    if callable(own):
        per_example = own(batch)
        if not isinstance(per_example, torch.Tensor) or tuple(per_example.shape) != (size,):
            got = tuple(per_example.shape) if isinstance(per_example, torch.Tensor) else None
            raise ModelError(f"per_example_loss must return one loss per record [{size}] "
                             f"(got {got})")
        return per_example
    inputs, labels = _split(batch)
    logits = model(**inputs)
    if logits.ndim != 2 or logits.shape[0] != size:
        raise ModelError(f"model must return logits [B, C] (got {tuple(logits.shape)})")
    return F.cross_entropy(logits, labels, reduction="none")


def _csprng_generator() -> torch.Generator:
    # Poisson sampling only (the noise never uses a torch generator). torch generators are not
    # CSPRNGs; seeding from the OS CSPRNG keeps the stream unpredictable
    return torch.Generator().manual_seed(secrets.randbits(63))


class PrivateTrainer:
    """DP-SGD over one model and dataset; build with :func:`make_private_trainer`."""

    def __init__(
        self,
        model: nn.Module,
        dataset: Dataset,
        *,
        config: DPConfig,
        data_loader: Any = None,
        accounted: AccountedRelease | None = None,
        seed: int | None = None,
    ) -> None:
        from opacus.accountants import RDPAccountant
        from opacus.utils.uniform_sampler import UniformWithReplacementSampler

        if not isinstance(config, DPConfig):
            raise DPGuardError(f"guard config: config must be a DPConfig (got {type(config)})")
        self.model = model
        self.dataset = dataset
        self.config = config
        self.seed = seed
        self.dataset_size = len(dataset)  # type: ignore[arg-type]
        if self.dataset_size < 1:
            raise DataError("dataset must hold at least one record (got 0)")
        self.layout = adapter_layout(model)
        self.accounted = accounted or _Accounted(
            config.noise_multiplier, config.sample_rate, config.local_steps
        )
        self._sampling_generator = (
            torch.Generator().manual_seed(seed) if seed is not None else _csprng_generator()
        )
        if data_loader is not None:
            if getattr(data_loader, "dataset", None) is not dataset:
                raise DPGuardError("guard sampler: data_loader must iterate over `dataset`")
            self.batch_sampler = data_loader.batch_sampler
        else:
            self.batch_sampler = UniformWithReplacementSampler(
                num_samples=self.dataset_size,
                sample_rate=config.sample_rate,
                steps=config.local_steps,
                generator=self._sampling_generator,
            )
        check_sampler(self.batch_sampler, dataset_size=self.dataset_size, config=config)

        self.named_trainable = [(e.name, dict(model.named_parameters())[e.name])
                                for e in self.layout.entries]
        params = [p for _, p in self.named_trainable]
        self.per_sample = FlatPerSampleGradients(model, self.named_trainable)
        self._closed = False
        try:
            if config.optimizer == "sgd":
                inner: torch.optim.Optimizer = torch.optim.SGD(params, lr=config.learning_rate)
            else:
                inner = torch.optim.Adam(params, lr=config.learning_rate)
            self.expected_batch_size = config.sample_rate * self.dataset_size
            self.optimizer = FlatDPOptimizer(
                inner,
                noise_multiplier=config.noise_multiplier,
                max_grad_norm=config.max_grad_norm,
                expected_batch_size=self.expected_batch_size,  # type: ignore[arg-type]
                loss_reduction="mean",
                # no generator: the noise is secfed.training.noise's (OS CSPRNG, snapped to a
                # grid, sampled exactly), never torch's seeded Mersenne Twister
            )
            self.accountant = RDPAccountant()
            self.optimizer.attach_step_hook(
                self.accountant.get_optimizer_hook_fn(sample_rate=config.sample_rate)
            )
        except BaseException:
            self.close()  # never leave hooks on the caller's model
            raise

    def close(self) -> None:
        """Remove the per-example hooks from the model (idempotent)."""
        if not self._closed:
            self._closed = True
            self.per_sample.close()
            for _, p in self.named_trainable:
                if hasattr(p, "summed_grad"):  # set by DPOptimizer's constructor
                    del p.summed_grad

    def _step(self, indices: list[int]) -> float | None:
        optimizer = self.optimizer  # overwrites every .grad each step: no zero_grad needed
        if not indices:
            # Empty Poisson batch: no forward pass (towers reject B=0); the step adds noise only.
            optimizer.set_per_sample_grads(torch.zeros((0, optimizer.dimension)))
            optimizer.step()
            return None
        batch = collate_examples([self.dataset[i] for i in indices])
        self.per_sample.start()
        per_example = per_example_losses(self.model, batch)
        optimizer.set_per_sample_grads(self.per_sample.compute(per_example))
        optimizer.step()
        return float(per_example.detach().mean())

    def train(self) -> TrainResult:
        """Run ``local_steps`` DP-SGD steps; leave the model at global + delta.

        If a delta guard trips, the adapter is put back to its global value before raising.

        Raises:
            DPGuardError: a guard tripped (see :mod:`secfed.training.guards`).
        """
        config = self.config
        if self._closed:
            raise DPGuardError("guard trainer: a PrivateTrainer trains once; build a new one")
        global_vec = get_flat(self.model, self.layout)
        was_training = self.model.training
        losses: list[float] = []
        batch_sizes: list[int] = []
        try:
            check_accounting(
                accounted=self.accounted, config=config, optimizer=self.optimizer,
                batch_sampler=self.batch_sampler, dataset_size=self.dataset_size,
            )
            self.model.train()  # dropout as in training
            with torch.random.fork_rng(devices=[]):
                if self.seed is not None:
                    torch.manual_seed(self.seed)  # dropout masks, reproducible in tests
                for indices in self.batch_sampler:
                    batch_sizes.append(len(indices))
                    loss = self._step(list(indices))
                    if loss is not None:
                        losses.append(loss)
        finally:
            self.optimizer.zero_grad(set_to_none=True)
            self.close()
            self.model.train(was_training)
        check_accountant_history(self.accountant.history, self.accounted)
        if len(batch_sizes) != self.accounted.steps:
            raise DPGuardError(
                f"guard steps: ran {len(batch_sizes)} steps, accounted {self.accounted.steps}"
            )
        local_vec = get_flat(self.model, self.layout)
        delta = local_vec - global_vec
        bound = delta_norm_bound(
            config=config, batch_sizes=batch_sizes, dimension=self.layout.total,
            dataset_size=self.dataset_size,
        )
        try:
            norm = check_adapter_delta(delta, bound=bound)
        except DPGuardError:
            set_flat(self.model, self.layout, global_vec)  # never leave a corrupted adapter
            raise
        # float32: global + (local - global) may differ from local in the last bit; the
        # contract is that the model is exactly global + delta.
        set_flat(self.model, self.layout, global_vec + delta)
        return TrainResult(
            delta=delta,
            layout=self.layout,
            steps=len(batch_sizes),
            sample_rate=config.sample_rate,
            noise_multiplier=config.noise_multiplier,
            max_grad_norm=config.max_grad_norm,
            mean_loss=float(np.mean(losses)) if losses else math.nan,
            expected_batch_size=self.expected_batch_size,
            batch_sizes=tuple(batch_sizes),
            delta_norm=norm,
            delta_norm_bound=bound,
        )


def make_private_trainer(
    model: nn.Module,
    dataset: Dataset,
    *,
    config: DPConfig,
    data_loader: Any = None,
    accounted: AccountedRelease | None = None,
    seed: int | None = None,
) -> PrivateTrainer:
    """The front door: a DP-SGD trainer whose settings are checked against the accounting.

    Args:
        model: a classifier with a LoRA adapter attached (its trainable parameters are the
            adapter layout).
        dataset: items are dicts of tensors per the model input contract plus ``labels``.
        config: the DP-SGD settings.
        data_loader: optional; if given it must be a Poisson (Opacus) loader over ``dataset``
            with exactly ``config.sample_rate`` and ``config.local_steps`` -- anything else is
            refused.
        accounted: the release the ledger is charged with (e.g. ``secfed.privacy``'s DP-SGD
            event); defaults to the one ``config`` describes. Checked against the optimizer.
        seed: fixes Poisson sampling and dropout for tests. Leave ``None`` in production:
            amplification by subsampling assumes the sample is secret. The DP noise is never
            seeded: it always comes from the OS CSPRNG (:mod:`secfed.training.noise`).

    Raises:
        DPGuardError: a guard tripped before training.
        ModelError: the model has no trainable parameter or an unsupported trainable layer.
    """
    return PrivateTrainer(model, dataset, config=config, data_loader=data_loader,
                          accounted=accounted, seed=seed)


def train_local(
    model: nn.Module,
    dataset: Dataset,
    *,
    config: DPConfig,
    seed: int | None = None,
    data_loader: Any = None,
    accounted: AccountedRelease | None = None,
) -> TrainResult:
    """Train the adapter locally with DP-SGD; returns delta = local - global (float32).

    See :func:`make_private_trainer` for the arguments.

    Raises:
        DPGuardError: a guard tripped (sampler, q/sigma/C/steps mismatch, bad delta).
    """
    trainer = make_private_trainer(model, dataset, config=config, data_loader=data_loader,
                                   accounted=accounted, seed=seed)
    return trainer.train()


def _evaluate_generative(model: nn.Module, dataset: Dataset, batch_size: int) -> dict[str, float]:
    n = len(dataset)  # type: ignore[arg-type]
    nll, tokens = 0.0, 0
    for start in range(0, n, batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, n))]
        total, counts = model.token_losses(collate_examples(items))  # type: ignore[operator]
        nll += float(total.sum())
        tokens += int(counts.sum())
    loss = nll / tokens if tokens else math.nan
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)) if tokens else math.nan,
            "tokens": tokens, "n": n}


def evaluate(model: nn.Module, dataset: Dataset, *, batch_size: int = 64) -> dict[str, float]:
    """Accuracy and mean cross-entropy over ``dataset`` (model in eval mode, restored after).

    A generative model (one with ``token_losses``) gets the mean NLL per target token
    (``loss``), its ``perplexity`` and the target ``tokens`` counted instead of an accuracy.
    """
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise DataError("evaluation dataset must not be empty")
    was_training = model.training
    model.eval()
    correct = 0
    total_loss = 0.0
    try:
        with torch.no_grad():
            if callable(getattr(model, "token_losses", None)):
                return _evaluate_generative(model, dataset, batch_size)
            for start in range(0, n, batch_size):
                items = [dataset[i] for i in range(start, min(start + batch_size, n))]
                inputs, labels = _split(collate_examples(items))
                logits = model(**inputs)
                total_loss += float(F.cross_entropy(logits, labels, reduction="sum"))
                correct += int((logits.argmax(dim=-1) == labels).sum())
    finally:
        model.train(was_training)
    return {"accuracy": correct / n, "loss": total_loss / n, "n": n}
