"""Likely mislabels and image/text mismatches, by confident learning.

Out-of-fold softmax probes (a record's own label never trains the probe that judges it) on the
sentence and clause-focus embeddings and on the image features, plus the label-free zero-shot
scores, are combined by a stacker fitted on the site's labels (non-negative weight per source,
class biases), so each source counts as much as it predicts here.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from secfed.data.quality.embed import Embeddings
from secfed.data.quality.probes import log_softmax, out_of_fold_log_probs, stacked_posterior
from secfed.data.quality.report import QualityReport
from secfed.data.quality.settings import QualitySettings

__all__ = ["find_label_defects"]


def find_label_defects(report: QualityReport, records: list, names: tuple[str, ...],
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
        runs = [np.exp(out_of_fold_log_probs(x, labels, np.flatnonzero(fit & present),
                                              n_classes, folds=s.folds,
                                              seed=s.probe_seed + k, weight_decay=weight_decay,
                                              judge=np.flatnonzero(judge & present)))
                for k in range(s.probe_repeats)]
        return np.log(np.mean(runs, axis=0))

    text_probe = probe(text_features, tp, s.text_weight_decay)
    image_probe = probe(image_features, ip, s.image_weight_decay)
    zero_shot, zero_shot_clauses = flat.copy(), flat.copy()
    zero_shot[tp] = log_softmax(emb.zero_shot[tp])
    zero_shot_clauses[tp] = log_softmax(emb.zero_shot_clauses[tp])
    text_sources = [text_probe, zero_shot, zero_shot_clauses]
    joint = stacked_posterior(text_sources + [image_probe], labels, np.flatnonzero(fit),
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
    text_post = stacked_posterior(text_sources, labels,
                                   np.flatnonzero(fit & tp & ~candidate), n_classes)
    candidate &= _text_agrees(text_post, best, labels, both=tp & ip, odds=s.mislabel_text_odds)
    image_post = stacked_posterior([image_probe], labels,
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
