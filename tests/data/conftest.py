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
    from secfed.data import generate_federation

    return generate_federation(tmp_path_factory.mktemp("fed") / "data", seed=FIXED_SEED,
                               scale="tiny")
