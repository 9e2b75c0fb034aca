"""Shared fixtures for the city-safety data tests: one tiny generated federation per session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FIXED_SEED = 20261126


@pytest.fixture(scope="session")
def federation(tmp_path_factory):
    from secfed.tasks.citysafety import generate_federation

    return generate_federation(tmp_path_factory.mktemp("fed") / "data", seed=FIXED_SEED,
                               scale="tiny")


@pytest.fixture(scope="session")
def model_bundle(tmp_path_factory):
    """The tiny city-safety classifier: (in-memory model, saved directory)."""
    from secfed.models import save_classifier
    from secfed.tasks.citysafety.model import build_city_safety_classifier

    model = build_city_safety_classifier(seed=5, size="tiny")
    model_dir = save_classifier(model, tmp_path_factory.mktemp("model") / "citysafety")
    return model, model_dir


@pytest.fixture(scope="session")
def quality_reports(federation, model_bundle):
    """``secfed data check`` results for every enterprise of the tiny federation."""
    from secfed.data.quality import check_dataset

    model, model_dir = model_bundle
    return {name: check_dataset(path, model_dir=model_dir, model=model)[0]
            for name, path in federation.enterprises.items()}
