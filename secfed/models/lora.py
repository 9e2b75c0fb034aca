"""Attach a PEFT LoRA adapter to a model, on Linear layers (and GPT-2's fused ``Conv1D``).

One ``LoraConfig`` whose ``target_modules`` is a full-name regex goes through
``peft.inject_adapter_in_model``; that covers the text and the image tower in one pass (module
names differ by tower in transformers 5.x) and freezes every other parameter, so the classifier's
head modules are re-enabled explicitly afterwards.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from secfed.errors import ConfigError, ModelError

__all__ = [
    "DEFAULT_TARGET_MODULES",
    "LoraSettings",
    "attach_lora",
    "is_lora_target_type",
    "lora_targets",
]

# Query and value projections of both towers: BERT-like `...attention.self.query|value`,
# ViT-like (transformers 5.x) `...attention.q_proj|v_proj`. LoRA on q/v is the setting of the
# LoRA paper (Hu et al. 2021, section 7.1).
DEFAULT_TARGET_MODULES = (
    r"(?:.*\.)?(?:attention\.self\.(?:query|value)|attention\.(?:q_proj|v_proj))"
)


@dataclass(frozen=True)
class LoraSettings:
    """LoRA hyper-parameters; ``target_modules`` is a regex matched against full module names."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str = DEFAULT_TARGET_MODULES

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"lora.rank must be an integer >= 1 (got {self.rank!r})")
        if not self.alpha > 0:
            raise ConfigError(f"lora.alpha must be > 0 (got {self.alpha!r})")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout must be in [0, 1) (got {self.dropout!r})")
        if not isinstance(self.target_modules, str) or not self.target_modules:
            raise ConfigError(
                f"lora.target_modules must be a non-empty regex string (got {self.target_modules!r})"
            )
        try:
            re.compile(self.target_modules)
        except re.error as exc:
            raise ConfigError(f"lora.target_modules is not a valid regex ({exc})") from None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoraSettings:
        known = {"rank", "alpha", "dropout", "target_modules"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"lora settings have unknown fields {unknown}")
        return cls(**data)


def is_lora_target_type(module: nn.Module) -> bool:
    """``nn.Linear`` or transformers' ``Conv1D`` (GPT-2's fused projections): PEFT puts
    ``nn.Linear`` LoRA matrices beside both, whose per-example gradients secfed computes."""
    if type(module) is nn.Linear:
        return True
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return type(module) is Conv1D


def lora_targets(model: nn.Module, settings: LoraSettings) -> list[str]:
    """Full names of the modules ``settings.target_modules`` selects (each must be nn.Linear
    or GPT-2's ``Conv1D``).

    Raises:
        ModelError: nothing matches, or a match is neither.
    """
    pattern = re.compile(settings.target_modules)
    matched = [(n, m) for n, m in model.named_modules() if n and pattern.fullmatch(n)]
    if not matched:
        raise ModelError(
            f"lora.target_modules {settings.target_modules!r} matches no module of "
            f"{type(model).__name__}"
        )
    bad = [(n, type(m).__name__) for n, m in matched if not is_lora_target_type(m)]
    if bad:
        raise ModelError(
            "LoRA targets must be nn.Linear layers or GPT-2 Conv1D (secfed computes the "
            f"per-sample gradients of their LoRA matrices); got {bad[:3]}"
        )
    return [n for n, _ in matched]


def attach_lora(
    model: nn.Module, settings: LoraSettings, *, trainable_modules: tuple[str, ...] = ()
) -> nn.Module:
    """Inject LoRA into ``model`` in place, freeze everything else, re-enable the head.

    Args:
        model: the classifier (towers plus head).
        settings: rank, alpha, dropout and the target regex.
        trainable_modules: names of sub-modules (the head, projections, missing-modality
            embeddings) whose parameters stay trainable next to the LoRA matrices.

    Raises:
        ModelError: the targets are not Linear, or a trainable module name does not exist.
    """
    from peft import LoraConfig, inject_adapter_in_model

    if any("lora_" in n for n, _ in model.named_parameters()):
        raise ModelError("model already carries a LoRA adapter")
    targets = lora_targets(model, settings)
    modules = dict(model.named_modules())
    for name in trainable_modules:
        if name not in modules:
            raise ModelError(f"trainable module {name!r} does not exist in the model")
        if name in targets or any(t.startswith(name + ".") for t in targets):
            raise ModelError(f"trainable module {name!r} overlaps the LoRA targets")
    # GPT-2's Conv1D stores its weight as [in, out]: PEFT must know to transpose when merging
    fan_in_fan_out = any(type(modules[t]) is not nn.Linear for t in targets)
    config = LoraConfig(
        r=settings.rank,
        fan_in_fan_out=fan_in_fan_out,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        bias="none",
    )
    model = inject_adapter_in_model(config, model)
    for p in model.parameters():
        p.requires_grad_(False)
    for n, p in model.named_parameters():
        if ".lora_A." in n or ".lora_B." in n:
            p.requires_grad_(True)
    for name in trainable_modules:
        for p in modules[name].parameters():
            p.requires_grad_(True)
    return model
