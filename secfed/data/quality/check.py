"""The front door of ``secfed data check``: load a dataset for the site's model, embed, check."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from secfed import progress
from secfed.data.loading import ImageTextDataset, load_dataset, model_inputs
from secfed.data.quality.duplicates import find_duplicates
from secfed.data.quality.embed import Embeddings, embed_dataset
from secfed.data.quality.labels import find_label_defects
from secfed.data.quality.report import QualityReport
from secfed.data.quality.settings import QualitySettings
from secfed.data.records import read_meta

__all__ = ["check_dataset", "find_defects"]


def find_defects(dataset: ImageTextDataset, emb: Embeddings,
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
        missing_text=[r.id for r, p in zip(records, emb.text_present) if not p]
        if "text" in dataset.modalities else [],
        missing_image=[r.id for r, p in zip(records, emb.image_present) if not p]
        if "image" in dataset.modalities else [],
    )
    duplicate_of = find_duplicates(dataset, emb, report, s)
    find_label_defects(report, records, names, labels, emb, keep=duplicate_of < 0, settings=s)
    return report


def check_dataset(data_dir: Path | str, *, model_dir: Path | str,
                  settings: QualitySettings | None = None, model=None) -> tuple[
                      QualityReport, ImageTextDataset]:
    """Load ``data_dir`` for the classifier in ``model_dir``, embed it and run every check.

    Raises:
        DataError: the dataset is malformed. ModelError: the model directory is unusable.
    """
    if model is None:
        from secfed.models.storage import load_classifier

        with progress.task("data check: loading the model"):
            model, _ = load_classifier(model_dir)
    # every record read and every image decoded before the minutes of embedding: a missing
    # or broken file is one error line, found first
    with progress.task("data check: reading the records and decoding their images"):
        dataset = load_dataset(data_dir, inputs=model_inputs(model_dir))
    descriptions = read_meta(Path(data_dir)).label_descriptions
    embedded = embed_dataset(model, dataset, descriptions=descriptions)
    with progress.task("data check: duplicates, mislabels, mismatches"):
        return find_defects(dataset, embedded, settings), dataset
