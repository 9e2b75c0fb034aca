"""Tiny towers on disk, shared by the model tests (built once per session)."""

import os

import pytest
import torch

from secfed.models.tiny import write_tiny_image_tower, write_tiny_text_tower

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Tiny models: one thread is faster than two here and leaves a core to the rest of the team.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def text_dir(tmp_path_factory):
    return write_tiny_text_tower(tmp_path_factory.mktemp("towers") / "text")


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory):
    return write_tiny_image_tower(tmp_path_factory.mktemp("towers") / "image")


@pytest.fixture
def build(text_dir, image_dir):
    """build(kind, **kw): a fresh tiny classifier of that kind."""
    from secfed.models import build_classifier

    def _build(kind, num_classes=3, seed=0, **kw):
        return build_classifier(
            kind=kind, num_classes=num_classes, seed=seed,
            text_model_dir=text_dir if kind != "image" else None,
            image_model_dir=image_dir if kind != "text" else None, **kw,
        )

    return _build
