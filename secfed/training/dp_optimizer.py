"""Opacus' ``DPOptimizer`` run on one flat ``[B, D]`` per-example gradient tensor.

The arithmetic is Opacus' (``clip_and_accumulate``, ``add_noise``, ``scale_grad``), done on the
whole adapter at once instead of parameter by parameter:

- per-example norms ``||g_i||`` over all parameters (one vector norm; Opacus' norm of the
  per-parameter norms is the same number), clip factor ``min(1, C / (||g_i|| + 1e-6))``;
- the clipped sum ``sum_i f_i g_i`` as one matrix-vector product;
- noise: NOT Opacus' ``_generate_noise`` (torch's Mersenne Twister, whose ``secure_mode`` needs
  torchcsprng, which does not exist for this torch): the clipped sum goes through
  :class:`secfed.training.noise.SecureGaussianNoise`, which adds ``N(0, (sigma C)^2 I_D)`` from
  the OS CSPRNG (AES-256-CTR keyed by ``secrets``) and snaps the result to a power-of-two grid,
  sampled exactly (Mironov's floating-point attack finds nothing below the grid; the rounding is
  post-processing, so the accountant's epsilon holds). A torch ``generator`` is refused and
  Opacus' ``secure_mode`` flag has no effect: nothing seeds the noise;
- division by ``expected_batch_size`` (``loss_reduction="mean"``) into one flat gradient buffer
  whose slices are the parameters' ``.grad`` (reattached if something set them to None); the
  wrapped optimizer steps.

The step hook (the RDP accountant) runs once per step, as in Opacus.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from opacus.optimizers import DPOptimizer

from secfed.errors import DPGuardError, ModelError
from secfed.training.noise import SecureGaussianNoise

__all__ = ["FlatDPOptimizer", "flat_gaussian_noise"]


def flat_gaussian_noise(std: float, size: int, *, generator: torch.Generator | None,
                        secure_mode: bool, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``size`` i.i.d. N(0, std^2) values, drawn as Opacus' ``_generate_noise`` draws them.

    The torch-generator noise the optimizer used before :mod:`secfed.training.noise`; kept only
    as the benchmark's reference (``bench/dp_overhead.py``). :class:`FlatDPOptimizer` never
    calls it.
    """
    if std == 0:
        return torch.zeros(size, dtype=dtype)
    if secure_mode:
        torch.normal(mean=0, std=std, size=(1, 1), generator=generator)  # thrown away (Opacus)
        draws = torch.normal(mean=0, std=std, size=(4, size), generator=generator)
        return (draws.sum(dim=0) / 2).to(dtype)
    return torch.normal(mean=0, std=std, size=(size,), generator=generator, dtype=dtype)


class FlatDPOptimizer(DPOptimizer):  # type: ignore[misc]
    """``DPOptimizer`` whose step takes the flat per-example gradients set by
    :meth:`set_per_sample_grads` (columns in the order of the wrapped optimizer's parameters).

    The noise comes from :class:`SecureGaussianNoise` for ``noise_multiplier * max_grad_norm``
    (rebuilt if either changes). ``noise_sampler`` replaces it (``values -> noised values``);
    only the benchmark's comparison with the old torch noise sets it.

    Raises:
        DPGuardError: a torch ``generator`` was given (the noise is never seeded).
        ModelError: the parameters do not share one dtype.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *,
                 noise_sampler: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 **kwargs: object) -> None:
        if kwargs.get("generator") is not None:
            raise DPGuardError("guard noise: the DP noise comes from the OS CSPRNG and is never "
                               "seeded (got a torch generator)")
        super().__init__(optimizer, **kwargs)
        self.noise_sampler = noise_sampler
        self._secure_noise: SecureGaussianNoise | None = None
        self._flat: torch.Tensor | None = None
        params = self.params
        dtypes = {p.dtype for p in params}
        if len(dtypes) != 1:
            names = sorted(map(str, dtypes))
            raise ModelError(f"trainable parameters must share one dtype (got {names})")
        self.dimension = sum(p.numel() for p in params)
        self._grad = torch.zeros(self.dimension, dtype=params[0].dtype, device=params[0].device)
        self._grad_views: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        offset = 0
        for p in params:
            self._grad_views.append((p, self._grad[offset:offset + p.numel()].view_as(p)))
            offset += p.numel()

    @property
    def accumulated_iterations(self) -> int:
        return 1  # one batch per step; no gradient accumulation

    def set_per_sample_grads(self, flat: torch.Tensor) -> None:
        """The ``[B, D]`` per-example gradients of the next step (``B = 0``: empty batch)."""
        if flat.dim() != 2 or flat.shape[1] != self.dimension:
            raise DPGuardError(
                f"guard per_sample_grads: per-example gradients must have shape [B, "
                f"{self.dimension}] (got {tuple(flat.shape)})"
            )
        self._flat = flat

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._flat = None
        self.original_optimizer.zero_grad(set_to_none)

    def clipped_sum(self, flat: torch.Tensor) -> torch.Tensor:
        """``sum_i min(1, C / (||g_i|| + 1e-6)) g_i`` over the rows of ``flat``."""
        if flat.shape[0] == 0:
            return flat.new_zeros(flat.shape[1])
        norms = torch.linalg.vector_norm(flat, dim=1)
        factors = (self.max_grad_norm / (norms + 1e-6)).clamp_(max=1.0)
        out: torch.Tensor = factors @ flat
        return out

    def noise(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The sampler the next step adds its noise with."""
        if self.noise_sampler is not None:
            return self.noise_sampler
        std = self.noise_multiplier * self.max_grad_norm
        if self._secure_noise is None or self._secure_noise.std != std:
            self._secure_noise = SecureGaussianNoise(std)
        return self._secure_noise

    def pre_step(self, closure: Callable[[], float] | None = None) -> bool:
        flat = self._flat
        if flat is None:
            raise DPGuardError("guard per_sample_grads: optimizer step without per-example "
                               "gradients (set_per_sample_grads was not called)")
        self._flat = None
        total = self.noise()(self.clipped_sum(flat))
        divisor = self.expected_batch_size if self.loss_reduction == "mean" else 1.0
        torch.div(total, divisor, out=self._grad)
        for p, view in self._grad_views:
            if p.grad is not view:
                p.grad = view
        if self.step_hook:
            self.step_hook(self)
        self._is_last_step_skipped = False
        return True
