"""Data-quality checks with pretrained models, run locally at a site (``secfed data check``).

Every record is embedded once (:mod:`.embed`): the classifier's own towers, the full pretrained
MiniLM sentence encoder (:mod:`.sentences`: its zero-shot similarity to a short description of
each class, for the whole report and for its best-matching clause), and hand-made colour/texture
statistics of the image (:mod:`.images`). Then:

* exact and near duplicates (:mod:`.duplicates`);
* likely mislabels, by confident learning (Northcutt et al., JAIR 2021; :mod:`.labels`, its
  probes and stacker in :mod:`.probes`): a record is flagged when the combined posterior gives
  its label little probability and another class much; records without text are judged on the
  image alone, under stricter bounds;
* image/text mismatches: the text-only posterior confidently names another class while the
  image-only posterior clearly favours the given label over the text's class;
* missing modalities and class balance.

The checks know no taxonomy: a dataset may describe its classes for the zero-shot scores in
``meta.json`` (``label_descriptions``); otherwise each class is described by its name.
:func:`write_cleaned` (:mod:`.clean`) writes a cleaned copy (duplicates dropped, contradicting
reports removed, likely mislabels kept for review, dropped or relabelled); the original is never
touched. Thresholds live in :class:`QualitySettings` (:mod:`.settings`).
"""

from __future__ import annotations

from secfed.data.quality.check import check_dataset, find_defects
from secfed.data.quality.clean import write_cleaned
from secfed.data.quality.embed import Embeddings, embed_dataset
from secfed.data.quality.images import image_statistics
from secfed.data.quality.report import MISLABEL_POLICIES, FixPlan, QualityReport
from secfed.data.quality.settings import QualitySettings

__all__ = [
    "MISLABEL_POLICIES",
    "Embeddings",
    "FixPlan",
    "QualityReport",
    "QualitySettings",
    "check_dataset",
    "embed_dataset",
    "find_defects",
    "image_statistics",
    "write_cleaned",
]
