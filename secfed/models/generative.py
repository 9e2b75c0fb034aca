"""Generative models (``causal-lm``, ``vision-language``): a LoRA-adapted Hugging Face LM whose
per-example loss is the mean cross-entropy of its *target* tokens.

Batches follow the model input contract (docs/CONTRACTS.md) plus ``labels [B, T]``: the token
ids the model must predict, ``-100`` on prompt, user and padding tokens (only completion /
assistant tokens count). Rows are right-padded to a fixed length; each forward pass trims the
batch to its longest row first, so padding costs nothing. One row is one record: nothing is
packed, so a per-example gradient is a per-record gradient, the DP privacy unit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from secfed.errors import DataError, ModelError
from secfed.models.lora import LoraSettings

__all__ = ["GENERATIVE_TASKS", "IGNORE_INDEX", "CausalLM", "GenerativeInfo"]

GENERATIVE_TASKS = ("causal-lm", "vision-language")
#: Label of a token that carries no loss (Hugging Face's convention).
IGNORE_INDEX = -100


@dataclass(frozen=True)
class GenerativeInfo:
    """How records become model inputs, and what the model was built from."""

    task: str
    max_length: int
    lora: LoraSettings
    targets: tuple[str, ...]
    architecture: str
    image_size: int | None = None
    image_tokens: int | None = None
    image_token_id: int | None = None
    image_mean: tuple[float, float, float] | None = None
    image_std: tuple[float, float, float] | None = None
    tokenizer: Any = field(default=None, compare=False, repr=False)

    @property
    def kind(self) -> str:
        return self.task


class CausalLM(nn.Module):
    """A Hugging Face causal (or image-text-to-text) LM as ``self.lm``, with a per-example loss.

    ``forward(**batch)`` returns the logits ``[B, T', V]`` of the trimmed batch; the trainer calls
    :meth:`per_example_loss` instead of a classification loss.
    """

    head_modules: tuple[str, ...] = ()

    def __init__(self, lm: nn.Module, task: str) -> None:
        super().__init__()
        if task not in GENERATIVE_TASKS:
            raise ModelError(f"generative task must be one of {GENERATIVE_TASKS} (got {task!r})")
        self.task = task
        self.lm = lm

    def towers(self) -> dict[str, nn.Module]:
        return {"lm": self.lm}

    @staticmethod
    def _trim(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int]:
        ids, mask = batch.get("input_ids"), batch.get("attention_mask")
        if ids is None or mask is None or ids.ndim != 2 or mask.shape != ids.shape:
            raise DataError("a generative batch needs input_ids and attention_mask [B, T]")
        length = max(int(mask.sum(dim=1).max()), 1)
        return ids[:, :length], mask[:, :length], length

    def forward(self, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, **unused: Any) -> torch.Tensor:
        ids, mask, _ = self._trim({"input_ids": input_ids, "attention_mask": attention_mask})
        kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "use_cache": False}
        if self.task == "vision-language":
            if pixel_values is None:
                raise DataError("a vision-language batch needs pixel_values")
            kwargs["pixel_values"] = pixel_values
        return self.lm(**kwargs).logits

    def token_losses(self, batch: dict[str, torch.Tensor]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row: the summed next-token NLL over its target tokens, and their count.

        Raises:
            DataError: ``labels`` missing or not ``[B, T]`` like ``input_ids``.
        """
        labels = batch.get("labels")
        if labels is None or labels.shape != batch["input_ids"].shape:
            raise DataError("a generative batch needs labels [B, T] (IGNORE_INDEX where no loss)")
        logits = self(**batch)
        length = logits.shape[1]
        # position t predicts token t + 1
        targets = labels[:, 1:length].long()
        nll = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), targets,
                              ignore_index=IGNORE_INDEX, reduction="none")
        counts = (targets != IGNORE_INDEX).sum(dim=1)
        return nll.sum(dim=1), counts

    def per_example_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean NLL of each row's target tokens ``[B]`` (0 for a row with none left)."""
        total, counts = self.token_losses(batch)
        return total / counts.clamp(min=1).to(total.dtype)
