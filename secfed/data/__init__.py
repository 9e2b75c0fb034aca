"""The on-disk dataset format any site's data uses, loading it for a model, quality checks.

The format readers need only the standard library; ``load_dataset`` (torch) is imported on first
use so ``import secfed.data`` is cheap. The demo's generated city-safety data lives in
:mod:`secfed.tasks.citysafety`.
"""

from __future__ import annotations

from typing import Any

from secfed.data.records import DatasetMeta, Record, read_meta, read_records, write_records

__all__ = [
    "DatasetMeta",
    "Record",
    "load_dataset",
    "read_meta",
    "read_records",
    "write_records",
]


def __getattr__(name: str) -> Any:
    if name == "load_dataset":
        from secfed.data.loading import load_dataset

        return load_dataset
    raise AttributeError(name)
