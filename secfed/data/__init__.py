"""Multimodal (image + text + label) city-safety datasets, the on-disk format, quality checks.

``generate_federation`` and the format readers need only numpy and Pillow; ``load_dataset``
(torch) and ``prepare_demo_model`` are imported on first use so ``import secfed.data`` is cheap.
"""

from __future__ import annotations

from typing import Any

from secfed.data.generate import FederationData, generate_federation
from secfed.data.records import DatasetMeta, Record, read_meta, read_records, write_records
from secfed.data.taxonomy import ENTERPRISES, HAZARD_CLASSES

__all__ = [
    "ENTERPRISES",
    "HAZARD_CLASSES",
    "DatasetMeta",
    "FederationData",
    "Record",
    "generate_federation",
    "load_dataset",
    "prepare_demo_model",
    "read_meta",
    "read_records",
    "write_records",
]


def __getattr__(name: str) -> Any:
    if name == "load_dataset":
        from secfed.data.loading import load_dataset

        return load_dataset
    if name == "prepare_demo_model":
        from secfed.models.citysafety import prepare_demo_model

        return prepare_demo_model
    raise AttributeError(name)
