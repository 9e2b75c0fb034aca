"""Which modules LoRA adapts: the attention query/value projections of each architecture.

``auto`` looks for the projection leaves known per family -- ``q_proj``/``v_proj`` (Llama,
Qwen2, Mistral, Gemma, CLIP, SigLIP, ViT in transformers 5.x, LLaVA's language model),
``query``/``value`` (BERT family), ``q_lin``/``v_lin`` (DistilBERT), ``query_proj``/``value_proj``
(DeBERTa), GPT-2's fused ``c_attn`` ``Conv1D`` (query, key and value in one) -- under an attention
module, and returns one regex that selects exactly those modules (LoRA on q/v is the setting of
the LoRA paper, Hu et al. 2021, section 7.1). A vision-language model gets LoRA on its language
model only, unless the vision tower is asked for too.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

from secfed.errors import ModelError
from secfed.models.lora import is_lora_target_type

__all__ = ["QUERY_VALUE_LEAVES", "auto_lora_targets", "named_lora_targets", "targets_regex"]

#: Leaf names of query/value projections, most specific first.
QUERY_VALUE_LEAVES = (
    ("q_proj", "v_proj"),
    ("query", "value"),
    ("query_proj", "value_proj"),
    ("q_lin", "v_lin"),
    ("c_attn",),  # GPT-2: one Conv1D for q, k and v
)
# A parent module name that says "attention" in the families above.
_ATTENTION_PARENT = re.compile(r"(?:^|\.)(?:self_attn|attention|attn|self|SelfAttention)$")
# Sub-modules of a vision-language model that belong to its vision side.
_VISION_PARTS = ("vision_tower", "vision_model", "visual", "multi_modal_projector")


def _is_vision(name: str) -> bool:
    return any(part in _VISION_PARTS for part in name.split("."))


def targets_regex(names: Sequence[str]) -> str:
    """A full-match regex selecting exactly ``names`` (escaped alternation, grouped by the
    layer index so that it stays short for deep models)."""
    generic: dict[str, str] = {}
    for name in names:
        generic.setdefault(re.sub(r"\.\d+\.", ".#.", name), name)
    parts = sorted(re.escape(g).replace(r"\.\#\.", r"\.\d+\.") for g in generic)
    return "(?:" + "|".join(parts) + ")"


def _candidates(model: nn.Module, *, vision: bool, language: bool
                ) -> list[tuple[str, nn.Module]]:
    out = []
    for name, module in model.named_modules():
        if not name or not is_lora_target_type(module):
            continue
        side_vision = _is_vision(name)
        if (side_vision and not vision) or (not side_vision and not language):
            continue
        out.append((name, module))
    return out


def auto_lora_targets(model: nn.Module, *, vision: bool = True, language: bool = True
                      ) -> tuple[str, list[str]]:
    """The query/value projections of ``model``: ``(regex, module names)``.

    Args:
        vision: include modules of a vision tower / projector (by module name).
        language: include every other module.

    Raises:
        ModelError: no known query/value projection found (name them with ``--lora-targets``).
    """
    found = _candidates(model, vision=vision, language=language)
    known = {leaf for leaves in QUERY_VALUE_LEAVES for leaf in leaves}
    # every family's projections: a fusion model holds a BERT and a ViT tower side by side
    chosen = [n for n, _ in found
              if n.rsplit(".", 1)[-1] in known
              and _ATTENTION_PARENT.search(n.rsplit(".", 1)[0] if "." in n else "")]
    if chosen:
        return _checked(model, chosen)
    raise ModelError(
        f"lora targets 'auto' found no attention query/value projection in "
        f"{type(model).__name__} (known leaves {[x for pair in QUERY_VALUE_LEAVES for x in pair]}); "
        "name the modules with --lora-targets NAME,..."
    )


def named_lora_targets(model: nn.Module, leaves: Sequence[str], *, vision: bool = True,
                       language: bool = True) -> tuple[str, list[str]]:
    """The modules whose last name component is in ``leaves``: ``(regex, module names)``.

    Raises:
        ModelError: an empty or malformed name, a name matching no module, or a match that is
            not an ``nn.Linear`` / GPT-2 ``Conv1D``.
    """
    leaves = [leaf.strip() for leaf in leaves]
    if not leaves or any(not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", leaf) for leaf in leaves):
        raise ModelError(
            f"lora targets must be 'auto' or module names like q_proj,v_proj (got {list(leaves)})"
        )
    chosen = []
    for leaf in leaves:
        hits = [(n, m) for n, m in model.named_modules()
                if n.rsplit(".", 1)[-1] == leaf and (vision or not _is_vision(n))
                and (language or _is_vision(n))]
        if not hits:
            raise ModelError(f"lora target {leaf!r} matches no module of {type(model).__name__}")
        bad = [(n, type(m).__name__) for n, m in hits if not is_lora_target_type(m)]
        if bad:
            raise ModelError(
                f"lora target {leaf!r} must name nn.Linear or Conv1D layers (got {bad[0][1]} "
                f"at {bad[0][0]})"
            )
        chosen.extend(n for n, _ in hits)
    return _checked(model, sorted(set(chosen)))


def _checked(model: nn.Module, chosen: list[str]) -> tuple[str, list[str]]:
    regex = targets_regex(chosen)
    pattern = re.compile(regex)
    matched = sorted(n for n, _ in model.named_modules() if n and pattern.fullmatch(n))
    if matched != sorted(chosen):  # the compact form over-reached: list every name instead
        regex = "(?:" + "|".join(re.escape(n) for n in sorted(chosen)) + ")"
    return regex, sorted(chosen)
