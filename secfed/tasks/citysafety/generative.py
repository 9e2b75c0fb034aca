"""The generative city-safety model: a small causal LM pre-trained here, LoRA-tuned by the sites.

No language-model weights exist on this machine (no downloads), so ``secfed demo prepare --task
generative`` pre-trains a small Llama-shaped model once, from a ``transformers`` config, on
generated city-safety text (:func:`~secfed.tasks.citysafety.instructions.pretraining_corpus`):
reports in every enterprise's style and safety-manual lines. It stands in for the vertical
foundation model an enterprise would start from. ``secfed model init --task causal-lm`` then
turns it into a secfed model directory (LoRA on the attention query/value projections), which
every enterprise fine-tunes with DP-SGD on its own instruction records.

:func:`answer_accuracy` generates greedily and scores each answer field; held-out perplexity
comes from :func:`secfed.training.evaluate`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from secfed.errors import ModelError
from secfed.tasks.citysafety.instructions import (
    ANSWER_FIELDS,
    parse_answer,
    pretraining_corpus,
)

__all__ = ["LM_SIZES", "LMSize", "answer_accuracy", "generate_answers",
           "prepare_generative_model", "pretrain_base_lm"]


@dataclass(frozen=True)
class LMSize:
    """Architecture and pre-training budget of the stand-in foundation model."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    max_length: int
    pretrain_texts: int
    pretrain_epochs: int
    lora_rank: int


LM_SIZES: dict[str, LMSize] = {
    "tiny": LMSize(48, 2, 4, 2, 400, 160, 3000, 2, 8),
    "demo": LMSize(96, 3, 4, 2, 800, 96, 20000, 2, 8),
    "full": LMSize(128, 4, 4, 2, 1000, 96, 40000, 3, 8),
}


def _encode_corpus(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    """Token ids as the instruction format builds them (prompt with special tokens, answer
    without, then EOS), so pre-training sees the boundaries fine-tuning will."""
    out = []
    for text in texts:
        head, sep, tail = text.partition("\nAnswer:")
        if sep:
            ids = (tokenizer(head + sep, add_special_tokens=True)["input_ids"]
                   + tokenizer(tail, add_special_tokens=False)["input_ids"])
        else:
            ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        out.append(list(ids)[: max_length - 1] + [int(tokenizer.eos_token_id)])
    return out


def pretrain_base_lm(out_dir: Path | str, *, size: str = "demo", seed: int = 0,
                     log: Callable[[str], None] | None = None,
                     epochs: int | None = None) -> Path:
    """Write a pre-trained small causal LM (weights, tokenizer) to ``out_dir``; returns it.

    A byte-level BPE tokenizer and a Llama-shaped model are built from scratch (random init
    from a ``transformers`` config), then trained with AdamW on the corpus (full weights,
    non-private: public generated text). Returns in eval mode on disk (safetensors).
    ``epochs`` overrides the size's ``pretrain_epochs`` (the benchmarks' pre-training lever).

    Raises:
        ModelError: unknown ``size``, ``epochs`` below 1, or a non-empty ``out_dir``.
    """
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from secfed.models.tiny import write_tiny_causal_lm

    if size not in LM_SIZES:
        raise ModelError(f"size must be one of {sorted(LM_SIZES)} (got {size!r})")
    if epochs is not None and epochs < 1:
        raise ModelError(f"epochs must be at least 1 (got {epochs!r})")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ModelError(f"out_dir must be empty or new (got non-empty {str(out)!r})")
    cfg = LM_SIZES[size]
    corpus = pretraining_corpus(cfg.pretrain_texts, seed=seed)
    write_tiny_causal_lm(out, arch="llama", corpus=corpus, vocab_size=cfg.vocab,
                         hidden_size=cfg.hidden, num_layers=cfg.layers, num_heads=cfg.heads,
                         num_kv_heads=cfg.kv_heads, max_length=cfg.max_length, seed=seed)
    tok = PreTrainedTokenizerFast.from_pretrained(  # nosec B615  # the local dir just written
        str(out), local_files_only=True)
    lm = AutoModelForCausalLM.from_pretrained(  # nosec B615  # the local dir just written
        str(out), local_files_only=True, use_safetensors=True)
    rows = _encode_corpus(tok, corpus, cfg.max_length)
    _train_lm(lm, rows, pad=int(tok.pad_token_id), seed=seed,
              epochs=cfg.pretrain_epochs if epochs is None else epochs,
              log=log)
    lm.save_pretrained(str(out))
    return out


def _train_lm(lm: nn.Module, rows: list[list[int]], *, pad: int, epochs: int, seed: int,
              log: Callable[[str], None] | None, batch: int = 64, lr: float = 3e-3) -> None:
    """Plain causal-LM training on token rows (every token predicted), AdamW, one-cycle LR."""

    def batch_loss(indices: list[int]) -> torch.Tensor:
        chunk = [rows[i] for i in indices]
        width = max(len(r) for r in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, r in enumerate(chunk):
            ids[j, :len(r)] = torch.tensor(r)
            mask[j, :len(r)] = 1
        labels = ids.masked_fill(mask == 0, -100)
        return lm(input_ids=ids, attention_mask=mask, labels=labels).loss

    train_in_batches(lm, list(lm.parameters()), batch_loss, rows=len(rows), epochs=epochs,
                     steps=epochs * math.ceil(len(rows) / batch), batch=batch, lr=lr, seed=seed,
                     log=log, what="language model pre-training", loss_name="loss")
    lm.eval()


def train_in_batches(model: nn.Module, params: list[nn.Parameter],
                     batch_loss: Callable[[list[int]], torch.Tensor], *, rows: int, epochs: int,
                     steps: int, batch: int, lr: float, seed: int,
                     log: Callable[[str], None] | None, what: str, loss_name: str) -> None:
    """Train ``params`` of ``model`` for ``epochs`` passes over ``rows`` examples in shuffled
    batches: AdamW (weight decay 0.01), a one-cycle LR over ``steps``, gradient norm clipped to 1.

    ``batch_loss`` maps a batch's row indices to its loss. Seeded by ``seed`` inside a forked
    RNG (the caller's torch RNG is untouched); leaves ``model`` in train mode. Logs each
    epoch's mean loss as ``"<what> epoch e/E: <loss_name> x"``.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
        model.train()
        for epoch in range(epochs):
            order = torch.randperm(rows).tolist()
            total, count = 0.0, 0
            for start in range(0, len(order), batch):
                loss = batch_loss(order[start:start + batch])
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                sched.step()
                total, count = total + float(loss.detach()), count + 1
            if log is not None:
                log(f"{what} epoch {epoch + 1}/{epochs}: {loss_name} {total / max(count, 1):.3f}")


def prepare_generative_model(out_dir: Path | str, *, seed: int, size: str = "demo",
                             log: Callable[[str], None] | None = None) -> Path:
    """Pre-train the stand-in foundation model (``out_dir/base``) and make the secfed model
    directory the sites fine-tune (``out_dir/model``: LoRA r on q/v, ``secfed model init``).

    Raises:
        ModelError: unknown size or a non-empty ``out_dir``.
    """
    from secfed.models import init_model

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ModelError(f"out_dir must be empty or new (got non-empty {str(out)!r})")
    cfg = LM_SIZES.get(size)
    if cfg is None:
        raise ModelError(f"size must be one of {sorted(LM_SIZES)} (got {size!r})")
    base = pretrain_base_lm(out / "base", size=size, seed=seed, log=log)
    report = init_model(base, task="causal-lm", out=out / "model", lora_r=cfg.lora_rank,
                        lora_alpha=2 * cfg.lora_rank, max_length=cfg.max_length, seed=seed,
                        log=log)
    return report.out


def _prompt_rows(tokenizer, prompts: list[str], image: tuple[int, int] | None) -> list[list[int]]:
    """Prompt token ids; with ``image = (token id, count)``, the image placeholders after BOS
    (where :mod:`secfed.data.instructions` puts them)."""
    rows = [list(tokenizer(p, add_special_tokens=True)["input_ids"]) for p in prompts]
    if image is None:
        return rows
    token, count = image
    bos = tokenizer.bos_token_id
    out = []
    for r in rows:
        at = 1 if r and bos is not None and r[0] == bos else 0
        out.append(r[:at] + [int(token)] * int(count) + r[at:])
    return out


@torch.no_grad()
def generate_answers(model: nn.Module, tokenizer, prompts: list[str], *,
                     max_new_tokens: int = 28, batch_size: int = 64,
                     pixel_values: torch.Tensor | None = None,
                     image: tuple[int, int] | None = None) -> list[str]:
    """Greedy completions of ``prompts`` (the text after the prompt, up to EOS); a
    vision-language model also gets each prompt's frame (``pixel_values [N, 3, S, S]``) and
    ``image = (image token id, tokens per image)``.

    Raises:
        ModelError: ``pixel_values`` without ``image`` (or the other way), or not one per prompt.
    """
    if (pixel_values is None) != (image is None) or (
            pixel_values is not None and len(pixel_values) != len(prompts)):
        raise ModelError("pixel_values (one per prompt) and image go together (got "
                         f"{None if pixel_values is None else len(pixel_values)} frames for "
                         f"{len(prompts)} prompts, image {image!r})")
    lm = model.lm if hasattr(model, "lm") else model
    was_training = lm.training
    lm.eval()
    eos, pad = int(tokenizer.eos_token_id), int(tokenizer.pad_token_id)
    out: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            rows = _prompt_rows(tokenizer, prompts[start:start + batch_size], image)
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for j, r in enumerate(rows):  # left padding: every row ends where generation starts
                ids[j, width - len(r):] = torch.tensor(r)
                mask[j, width - len(r):] = 1
            extra = {} if pixel_values is None else {
                "pixel_values": pixel_values[start:start + batch_size]}
            generated = lm.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                    max_new_tokens=max_new_tokens, eos_token_id=eos,
                                    pad_token_id=pad, **extra)
            for row in generated[:, width:].tolist():
                row = row[:row.index(eos)] if eos in row else row
                out.append(tokenizer.decode(row, skip_special_tokens=True))
    finally:
        lm.train(was_training)
    return out


def answer_accuracy(model: nn.Module, tokenizer, records: list[dict[str, str]], *,
                    pixel_values: torch.Tensor | None = None,
                    image: tuple[int, int] | None = None) -> dict[str, float]:
    """Per answer field, the share of ``records`` (``prompt``/``completion`` dicts) whose
    greedy answer names it exactly; ``fields`` is their mean, ``exact`` all three right.
    A vision-language model gets the records' frames as in :func:`generate_answers`."""
    answers = generate_answers(model, tokenizer, [r["prompt"] for r in records],
                               pixel_values=pixel_values, image=image)
    right = np.zeros((len(records), len(ANSWER_FIELDS)), bool)
    for i, (r, text) in enumerate(zip(records, answers)):
        want, got = parse_answer(r["completion"]), parse_answer(text)
        right[i] = [want[f] == got[f] and want[f] != "" for f in ANSWER_FIELDS]
    out = {f: float(right[:, k].mean()) for k, f in enumerate(ANSWER_FIELDS)}
    out["fields"] = float(right.mean())
    out["exact"] = float(right.all(1).mean())
    return out
