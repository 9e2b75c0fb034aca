"""The vision-language variant of the generative city-safety task: a small LLaVA-style model.

An incident report *and its camera frame* in, the same structured answer out. No
vision-language weights exist on this machine, so ``secfed demo prepare --task generative
--vision`` assembles one the way LLaVA is built (Liu et al. 2023): a vision tower (a tiny
CLIP-shaped ViT, random init from a ``transformers`` config), the two-layer projector, and the
pre-trained stand-in language model of :mod:`secfed.tasks.citysafety.generative`, its weights
copied unchanged. A short *alignment* stage (LLaVA's stage 1) then trains the vision tower and
projector -- the language model frozen -- to caption public, generic scenes in generic words
(``A camera frame showing: flood water``); never an enterprise's frame or report. That is the
stand-in vision-language foundation model; ``secfed model init --task vision-language`` puts
LoRA on its language model's q/v projections, and the sites fine-tune it with DP-SGD on their
records (report + frame). The frames matter: a vague report ("see attached") names no hazard,
its frame still shows it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from secfed.errors import ModelError
from secfed.tasks.citysafety.generative import train_in_batches
from secfed.tasks.citysafety.scenes import FRAME_SIZE, render_scene
from secfed.tasks.citysafety.taxonomy import HAZARD_CLASSES, HAZARD_DESCRIPTIONS

__all__ = ["VL_SIZES", "VisionSize", "build_vision_language_base", "prepare_vision_language_model"]

#: The image placeholder token of the tokenizer (:data:`secfed.models.tiny.TINY_SPECIAL`).
IMAGE_TOKEN = "<image>"  # nosec B105  # a token name, not a secret
_PREPROCESSOR = "preprocessor_config.json"
_CAPTION = "A camera frame showing:"


@dataclass(frozen=True)
class VisionSize:
    """The vision tower and the alignment budget of the stand-in vision-language model."""

    hidden: int
    layers: int
    patch: int  # FRAME_SIZE / patch squared image tokens per frame
    align_images: int
    align_epochs: int


VL_SIZES: dict[str, VisionSize] = {
    "tiny": VisionSize(32, 1, 16, 64, 1),
    "demo": VisionSize(64, 2, 12, 3000, 2),
    "full": VisionSize(96, 2, 12, 6000, 2),
}


def _alignment_rows(tokenizer, n: int, seed: int, image_tokens: int, image_id: int
                    ) -> tuple[list[list[int]], list[int], torch.Tensor]:
    """Generic captioned scenes: token rows (image tokens after BOS), the caption's first
    target position per row, and the normalised frames ``[n, 3, S, S]``."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xA11]))
    rows, starts, frames = [], [], []
    for _ in range(n):
        label = HAZARD_CLASSES[int(rng.integers(0, len(HAZARD_CLASSES)))]
        frame = render_scene(label, rng, night_fraction=float(rng.uniform(0.1, 0.6)),
                             tint=tuple(float(t) for t in rng.uniform(0.88, 1.1, size=3)))
        words = str(rng.choice(HAZARD_DESCRIPTIONS[label]))
        head = list(tokenizer(_CAPTION, add_special_tokens=True)["input_ids"])
        tail = list(tokenizer(f" {words}", add_special_tokens=False)["input_ids"])
        head = head[:1] + [image_id] * image_tokens + head[1:]
        rows.append(head + tail + [int(tokenizer.eos_token_id)])
        starts.append(len(head))
        frames.append(torch.from_numpy(frame.astype(np.float32) / 255.0).permute(2, 0, 1))
    return rows, starts, (torch.stack(frames) - 0.5) / 0.5


def _align(model: nn.Module, tokenizer, size: VisionSize, *, seed: int,
           log: Callable[[str], None] | None, batch: int = 32, lr: float = 2e-3) -> None:
    """LLaVA stage 1: train the vision tower and projector to caption generic scenes (the
    language model frozen); loss on the caption tokens only."""
    cfg = model.config
    tokens = (FRAME_SIZE // size.patch) ** 2
    rows, starts, frames = _alignment_rows(tokenizer, size.align_images, seed, tokens,
                                           int(cfg.image_token_id))
    for p in model.model.language_model.parameters():
        p.requires_grad_(False)
    model.lm_head.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    steps = max(1, size.align_epochs * math.ceil(len(rows) / batch))
    pad = int(tokenizer.pad_token_id)

    def batch_loss(chunk: list[int]) -> torch.Tensor:
        width = max(len(rows[i]) for i in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for j, i in enumerate(chunk):
            ids[j, :len(rows[i])] = torch.tensor(rows[i])
            mask[j, :len(rows[i])] = 1
            labels[j, starts[i]:len(rows[i])] = ids[j, starts[i]:len(rows[i])]
        return model(input_ids=ids, attention_mask=mask, pixel_values=frames[chunk],
                     labels=labels).loss

    train_in_batches(model, params, batch_loss, rows=len(rows), epochs=size.align_epochs,
                     steps=steps, batch=batch, lr=lr, seed=seed, log=log,
                     what="vision-language alignment", loss_name="caption loss")
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()


def build_vision_language_base(lm_dir: Path | str, out_dir: Path | str, *, size: str = "demo",
                               seed: int = 0, log: Callable[[str], None] | None = None) -> Path:
    """Assemble a LLaVA-style checkpoint from the causal LM in ``lm_dir`` (weights copied
    unchanged) and a fresh vision tower, align it on generic scenes, and write it (safetensors,
    tokenizer, ``preprocessor_config.json``) to ``out_dir``; returns it.

    Raises:
        ModelError: unknown ``size``, a non-empty ``out_dir``, or an ``lm_dir`` without a
            causal LM, a tokenizer or an ``<image>`` token.
    """
    from transformers import (
        AutoModelForCausalLM,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        PreTrainedTokenizerFast,
    )

    if size not in VL_SIZES:
        raise ModelError(f"size must be one of {sorted(VL_SIZES)} (got {size!r})")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ModelError(f"out_dir must be empty or new (got non-empty {str(out)!r})")
    try:
        tok = PreTrainedTokenizerFast.from_pretrained(  # nosec B615  # a local directory
            str(lm_dir), local_files_only=True)
        lm = AutoModelForCausalLM.from_pretrained(  # nosec B615  # a local directory
            str(lm_dir), local_files_only=True, use_safetensors=True)
    except (OSError, ValueError) as exc:
        raise ModelError(f"lm_dir {str(lm_dir)!r} must hold a causal LM and its tokenizer "
                         f"({type(exc).__name__})") from None
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    if not isinstance(image_id, int) or image_id == tok.unk_token_id:
        raise ModelError(f"the tokenizer in {str(lm_dir)!r} must have an {IMAGE_TOKEN} token")
    vs = VL_SIZES[size]
    vision = CLIPVisionConfig(hidden_size=vs.hidden, intermediate_size=2 * vs.hidden,
                              num_hidden_layers=vs.layers, num_attention_heads=4,
                              image_size=FRAME_SIZE, patch_size=vs.patch)
    config = LlavaConfig(vision_config=vision, text_config=lm.config, image_token_id=image_id,
                         vision_feature_layer=-1, vision_feature_select_strategy="default",
                         projector_hidden_act="gelu",
                         tie_word_embeddings=bool(lm.config.tie_word_embeddings))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    model.model.language_model.load_state_dict(lm.model.state_dict())
    model.lm_head.load_state_dict(lm.lm_head.state_dict())
    _align(model, tok, vs, seed=seed, log=log)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    (out / _PREPROCESSOR).write_text(json.dumps(
        {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
         "size": {"height": FRAME_SIZE, "width": FRAME_SIZE}}) + "\n")
    return out


def prepare_vision_language_model(out_dir: Path | str, *, seed: int, size: str = "demo",
                                  lm_base: Path | str | None = None,
                                  log: Callable[[str], None] | None = None) -> Path:
    """The stand-in vision-language foundation model (``out_dir/base``, from the pre-trained
    causal LM ``lm_base``, or one pre-trained here into ``out_dir/lm-base``) and the secfed
    model directory the sites fine-tune (``out_dir/model``: ``secfed model init --task
    vision-language``, LoRA on the language model's q/v). Returns ``out_dir/model``.

    Raises:
        ModelError: unknown size, a non-empty ``out_dir`` or an unusable ``lm_base``.
    """
    from secfed.models import init_model
    from secfed.tasks.citysafety.generative import LM_SIZES, pretrain_base_lm

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ModelError(f"out_dir must be empty or new (got non-empty {str(out)!r})")
    cfg = LM_SIZES.get(size)
    if cfg is None or size not in VL_SIZES:
        raise ModelError(f"size must be one of {sorted(VL_SIZES)} (got {size!r})")
    if lm_base is None:
        lm_base = pretrain_base_lm(out / "lm-base", size=size, seed=seed, log=log)
    base = build_vision_language_base(lm_base, out / "base", size=size, seed=seed, log=log)
    image_tokens = (FRAME_SIZE // VL_SIZES[size].patch) ** 2
    report = init_model(base, task="vision-language", out=out / "model", lora_r=cfg.lora_rank,
                        lora_alpha=2 * cfg.lora_rank, max_length=cfg.max_length + image_tokens,
                        seed=seed, log=log)
    return report.out
