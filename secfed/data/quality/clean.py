"""``secfed data check --fix``: write a cleaned copy of a dataset (the original only read)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from secfed.data.quality.report import QualityReport
from secfed.data.records import IMAGES_DIR, DatasetMeta, Record, read_records, write_records
from secfed.errors import DataError

__all__ = ["write_cleaned"]


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
    src, dst = copy_target(data_dir, out_dir)
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
                               seed=meta.seed, scale=meta.scale,
                               label_descriptions=meta.label_descriptions)
    write_records(dst, kept, cleaned_meta)
    body = report.to_json() | {"fix": plan.to_json()}
    (dst / "quality_report.json").write_text(json.dumps(body, indent=1, sort_keys=True) + "\n")
    return dst


def copy_target(data_dir: Path | str, out_dir: Path | str) -> tuple[Path, Path]:
    """The resolved dataset and output directories of a cleaned copy.

    Raises:
        DataError: ``out_dir`` is the original, lies inside it (or it inside ``out_dir``), or
            is not empty.
    """
    src, dst = Path(data_dir).resolve(), Path(out_dir).resolve()
    if dst == src or dst.is_relative_to(src) or src.is_relative_to(dst):
        raise DataError(f"out must be a directory outside the dataset (got {str(out_dir)!r} "
                        f"for data {str(data_dir)!r})")
    if dst.exists() and any(dst.iterdir()):
        raise DataError(f"out must be empty or absent (got non-empty {str(out_dir)!r})")
    return src, dst
