"""Per-example gradients of all trainable parameters as one flat ``[B, D]`` tensor.

Forward hooks on each trainable module (nn.Linear, nn.Embedding, nn.LayerNorm, GPT-2's Conv1D)
keep its input and output. After the forward pass one ``torch.autograd.grad`` of the *summed* per-example losses
with respect to those outputs gives every module's backprops ``dl_i/dy``; the per-example
parameter gradients follow in closed form: Linear weight ``g_i^T x_i`` (one batched matmul; Opacus'
own formula; ``x_i^T g_i`` for Conv1D, which stores its weight transposed), bias ``sum_t g_i``
(over tokens for ``[B, T, F]`` activations); Embedding and LayerNorm through Opacus' grad samplers. They are
written side by side in layout order, so the optimizer clips, sums and noises them with a few
whole-tensor operations (:mod:`secfed.training.dp_optimizer`).

Against Opacus' GradSampleModule this drops the per-module backward hooks, the parameter ``.grad``
accumulation autograd would do and the per-parameter ``grad_sample`` bookkeeping, which dominated
a DP step on a tiny LoRA model. Every trainable parameter must be owned by a supported module and
receive per-example gradients for the whole batch each step (else ``guard per_sample_grads``, the
Opacus #820 failure); a module input or output modified in place after the call (the recorded
tensors would be wrong) and BatchNorm anywhere in the model (it mixes examples) are refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from secfed.errors import ModelError
from secfed.training.guards import check_per_sample_grads

__all__ = ["SUPPORTED_TRAINABLE", "FlatPerSampleGradients"]

# Trainable module types whose forward returns one tensor and whose per-example gradient is known
# (plus transformers' GPT-2 ``Conv1D``, see :func:`_supported`).
SUPPORTED_TRAINABLE = (nn.Linear, nn.Embedding, nn.LayerNorm)


def _is_conv1d(module: nn.Module) -> bool:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return type(module) is Conv1D


def _supported(module: nn.Module) -> bool:
    return type(module) in SUPPORTED_TRAINABLE or _is_conv1d(module)


def _linear_grads(module: nn.Linear, x: torch.Tensor, g: torch.Tensor
                  ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    batch = g.shape[0]
    x = x.to(g.dtype)
    weight = bias = None
    if g.dim() == 2:
        if module.weight.requires_grad:
            weight = torch.bmm(g.unsqueeze(2), x.unsqueeze(1))
        if module.bias is not None and module.bias.requires_grad:
            bias = g
    else:
        g3 = g.reshape(batch, -1, g.shape[-1])
        if module.weight.requires_grad:
            x3 = x.reshape(batch, -1, x.shape[-1])
            if g3.shape[-1] > x3.shape[-1]:  # CPU bmm is faster with the wider matrix last
                weight = torch.bmm(x3.transpose(1, 2), g3).transpose(1, 2)
            else:
                weight = torch.bmm(g3.transpose(1, 2), x3)
        if module.bias is not None and module.bias.requires_grad:
            bias = g3.sum(dim=1)
    return weight, bias


def _conv1d_grads(module: nn.Module, x: torch.Tensor, g: torch.Tensor
                  ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """GPT-2's ``Conv1D``: ``y = x @ W + b`` with ``W`` stored ``[in, out]``, so the per-example
    weight gradient is ``x_i^T g_i`` (the transpose of Linear's)."""
    batch = g.shape[0]
    x3 = x.to(g.dtype).reshape(batch, -1, x.shape[-1])
    g3 = g.reshape(batch, -1, g.shape[-1])
    weight = torch.bmm(x3.transpose(1, 2), g3) if module.weight.requires_grad else None
    bias = g3.sum(dim=1) if module.bias is not None and module.bias.requires_grad else None
    return weight, bias


def _opacus_grads(module: nn.Module, x: torch.Tensor, g: torch.Tensor
                  ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    from opacus.grad_sample.embedding import compute_embedding_grad_sample
    from opacus.grad_sample.layer_norm import compute_layer_norm_grad_sample

    sampler = (compute_embedding_grad_sample if isinstance(module, nn.Embedding)
               else compute_layer_norm_grad_sample)
    out = sampler(module, [x], g)
    bias = getattr(module, "bias", None)
    return out.get(module.weight), (out.get(bias) if bias is not None else None)


class FlatPerSampleGradients:
    """Hooks on ``model``'s trainable modules; :meth:`compute` returns ``[B, D]`` per-example
    gradients, column blocks in the order of ``named_params`` (the adapter layout).

    Raises:
        ModelError: a trainable parameter is not owned by a supported module.
    """

    def __init__(self, model: nn.Module, named_params: Sequence[tuple[str, nn.Parameter]]) -> None:
        self.named_params = list(named_params)
        slot_of = {id(p): i for i, (_, p) in enumerate(self.named_params)}
        self._slots: dict[nn.Module, tuple[int | None, int | None]] = {}
        owned: set[int] = set()
        for name, module in model.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                raise ModelError(
                    f"module {name} ({type(module).__name__}) mixes the examples of a batch: "
                    "per-example gradients (and their clipping) would not be per example"
                )
            own = [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]
            if not own:
                continue
            if not _supported(module):
                raise ModelError(
                    f"trainable module {name or '<root>'} ({type(module).__name__}) is not "
                    "supported: trainable layers must be nn.Linear, nn.Embedding, nn.LayerNorm "
                    "or GPT-2's Conv1D"
                )
            slots: dict[str, int] = {}
            for pname, p in own:
                if pname not in ("weight", "bias") or id(p) not in slot_of:
                    raise ModelError(f"trainable parameter {name}.{pname} is not in the layout")
                slots[pname] = slot_of[id(p)]
                owned.add(slots[pname])
            self._slots[module] = (slots.get("weight"), slots.get("bias"))
        missing = [self.named_params[i][0] for i in range(len(self.named_params))
                   if i not in owned]
        if missing:
            raise ModelError(f"trainable parameters {missing[:3]} belong to no nn.Module layer "
                             "with per-example gradients")
        # (module, input detached, output, input version, output version) per module call
        self._records: list[tuple[nn.Module, torch.Tensor | None, torch.Tensor, int, int]] = []
        self._recording = False
        self._handles = [m.register_forward_hook(self._forward_hook) for m in self._slots]

    def close(self) -> None:
        """Remove the hooks (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._records = []

    def start(self) -> None:
        """Record the modules' inputs and outputs of the next forward pass."""
        self._records = []
        self._recording = True

    def _forward_hook(self, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        if (self._recording and isinstance(output, torch.Tensor) and output.requires_grad):
            x = inputs[0].detach() if inputs and isinstance(inputs[0], torch.Tensor) else None
            version = x._version if x is not None else -1
            self._records.append((module, x, output, version, output._version))

    def compute(self, per_example_loss: torch.Tensor) -> torch.Tensor:
        """Per-example gradients ``[B, D]`` of ``per_example_loss`` (shape ``[B]``).

        Raises:
            DPGuardError: ``per_sample_grads`` -- a trainable parameter got none for the batch.
            ModelError: a module was called without a positional tensor input or its output
                was modified in place.
        """
        self._recording = False
        records, self._records = self._records, []
        batch = per_example_loss.shape[0]
        for module, x, output, x_version, out_version in records:
            if x is None or x._version != x_version or output._version != out_version:
                raise ModelError(
                    f"trainable {type(module).__name__} must take its input as a positional "
                    "tensor, and neither its input nor its output may be modified in place "
                    "after the call (per-example gradients would be wrong)"
                )
        backprops: Sequence[torch.Tensor | None] = (None,) * len(records)
        if records and per_example_loss.requires_grad:
            backprops = torch.autograd.grad(per_example_loss.sum(), [r[2] for r in records],
                                            allow_unused=True)
        parts: list[torch.Tensor | None] = [None] * len(self.named_params)
        with torch.no_grad():
            for (module, x, output, _, _), g in zip(records, backprops, strict=True):
                if g is None:  # the output does not reach the loss: zero gradient
                    g = torch.zeros_like(output)
                if isinstance(module, nn.Linear):
                    grads = _linear_grads(module, x, g)  # type: ignore[arg-type]
                elif _is_conv1d(module):
                    grads = _conv1d_grads(module, x, g)  # type: ignore[arg-type]
                else:
                    grads = _opacus_grads(module, x, g)  # type: ignore[arg-type]
                for slot, gs in zip(self._slots[module], grads, strict=True):
                    if slot is None or gs is None:
                        continue
                    flat = gs.reshape(gs.shape[0], -1)
                    if flat.shape[0] != batch:
                        check_per_sample_grads([(self.named_params[slot][0], flat)], batch)
                    prev = parts[slot]
                    parts[slot] = flat if prev is None else prev + flat
        check_per_sample_grads(
            [(name, part) for (name, _), part in zip(self.named_params, parts, strict=True)],
            batch,
        )
        return torch.cat(parts, dim=1)  # type: ignore[arg-type]
