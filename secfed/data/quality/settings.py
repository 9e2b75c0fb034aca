"""Thresholds of the data-quality checks."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["QualitySettings"]


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
