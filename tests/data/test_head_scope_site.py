"""A federation that trains only the fusion head: sites train on tower features computed once,
and what they aggregate is exactly the head of the full model."""

from __future__ import annotations

import numpy as np
import pytest

from secfed.config import RoundTerms
from secfed.errors import ConfigError, ModelError
from secfed.federation.plan import model_settings_for
from secfed.participant.adapter import ModelSite


def _terms() -> RoundTerms:
    return RoundTerms(round_number=1, mode="secagg", participants=("a", "b", "c"), threshold=2,
                      min_participants=2, noise_multiplier=1.0, sample_rate=0.2, local_steps=4,
                      max_grad_norm=1.0, learning_rate=0.01, optimizer="adam", delta=1e-5)


def test_head_settings_are_the_head_of_the_model(model_bundle) -> None:
    from secfed.models import load_classifier
    from secfed.models.scopes import select_trainable

    _, model_dir = model_bundle
    full = model_settings_for(model_dir=model_dir, synthetic_dim=None)
    head = model_settings_for(model_dir=model_dir, synthetic_dim=None, trainable="head")
    model, _ = load_classifier(model_dir)
    assert head.trainable == "head" and full.trainable == "adapter"
    assert head.vector_length == select_trainable(model, "head") < full.vector_length
    assert head.initial_global_hash != full.initial_global_hash
    with pytest.raises(ConfigError, match="needs --model"):
        model_settings_for(model_dir=None, synthetic_dim=8, trainable="head")
    with pytest.raises(ModelError, match="trainable scope must be one of"):
        model_settings_for(model_dir=model_dir, synthetic_dim=None, trainable="everything")


def test_head_site_trains_on_features_and_scores_like_the_full_model(
        federation, model_bundle, tmp_path) -> None:
    from secfed.data import load_dataset
    from secfed.models import adapter_layout, get_flat, load_classifier, set_flat
    from secfed.models.features import FeatureDataset
    from secfed.models.scopes import select_trainable
    from secfed.training import evaluate

    _, model_dir = model_bundle
    settings = model_settings_for(model_dir=model_dir, synthetic_dim=None, trainable="head")
    site = ModelSite(tmp_path / "kit", "energy_utility", settings, model_dir=model_dir,
                     data_dir=federation.enterprises["energy_utility"],
                     test_dir=federation.test_dir)
    assert isinstance(site.dataset, FeatureDataset)
    assert site.global_hash() == settings.initial_global_hash
    start = site.global_vector().copy()
    outcome = site.train(_terms())
    assert outcome.delta.shape == (settings.vector_length,)
    assert np.isfinite(outcome.delta).all() and np.abs(outcome.delta).max() > 0
    assert np.array_equal(site.global_vector(), start)  # the update leaves only via the protocol
    new = start + outcome.delta
    site.apply(new, round_number=1)
    mine = site.evaluate()

    # the same head vector in the full model (towers run on every record) scores the same
    model, _ = load_classifier(model_dir)
    select_trainable(model, "head")
    layout = adapter_layout(model)
    assert layout.total == settings.vector_length
    set_flat(model, layout, new)
    assert np.array_equal(get_flat(model, layout), new)
    ref = evaluate(model, load_dataset(federation.test_dir, model_dir=model_dir))
    assert mine["accuracy"] == pytest.approx(float(ref["accuracy"]), abs=1e-9)
    assert mine["loss"] == pytest.approx(float(ref["loss"]), rel=1e-4)


def test_federation_settings_name_exactly_the_models_trainable_sets() -> None:
    from typing import get_args

    from secfed.config import FEATURE_SCOPES, TrainableSet
    from secfed.models.scopes import TRAINABLE_SCOPES

    assert get_args(TrainableSet) == TRAINABLE_SCOPES
    assert set(FEATURE_SCOPES) < set(TRAINABLE_SCOPES)


def test_restarted_head_site_reads_its_tower_features_back(
        federation, model_bundle, tmp_path, monkeypatch) -> None:
    import torch

    import secfed.models.features as cs

    _, model_dir = model_bundle
    settings = model_settings_for(model_dir=model_dir, synthetic_dim=None, trainable="head")
    data = federation.enterprises["energy_utility"]
    first = ModelSite(tmp_path / "kit", "energy_utility", settings, model_dir=model_dir,
                      data_dir=data, test_dir=federation.test_dir)
    cache = tmp_path / "kit" / "features"
    assert sorted(p.name.split("-")[0] for p in cache.glob("*.safetensors")) == ["test", "train"]

    calls: list[int] = []
    real = cs.tower_features

    def counted(model, dataset, **kw):
        calls.append(len(dataset))
        return real(model, dataset, **kw)

    monkeypatch.setattr(cs, "tower_features", counted)
    again = ModelSite(tmp_path / "kit", "energy_utility", settings, model_dir=model_dir,
                      data_dir=data, test_dir=federation.test_dir)
    assert calls == []  # both read back, no tower run
    for key, value in first.dataset.features.items():
        assert torch.equal(again.dataset.features[key], value)
    assert again.evaluate() == first.evaluate()

    # other records under the same kit: the key differs, the towers run, the old file goes
    other = federation.enterprises["city_operations"]
    moved = ModelSite(tmp_path / "kit", "energy_utility", settings, model_dir=model_dir,
                      data_dir=other, test_dir=federation.test_dir)
    assert calls == [len(moved.dataset)]
    assert len(list(cache.glob("train-*.safetensors"))) == 1

    # a damaged cache file is recomputed, not trusted
    (train_file,) = cache.glob("train-*.safetensors")
    train_file.write_bytes(train_file.read_bytes()[:100])
    ModelSite(tmp_path / "kit", "energy_utility", settings, model_dir=model_dir,
              data_dir=other, test_dir=federation.test_dir)
    assert calls == [len(moved.dataset)] * 2


def test_feature_key_follows_the_towers_weights_and_every_input(model_bundle, federation) -> None:
    import torch

    from secfed.data import load_dataset
    from secfed.models import load_classifier
    from secfed.models.features import features_key

    _, model_dir = model_bundle
    model, _ = load_classifier(model_dir)
    data = load_dataset(federation.enterprises["energy_utility"], model_dir=model_dir)
    key = features_key(model, data)
    assert features_key(model, data) == key
    changed = data.subset(list(range(len(data))))
    changed.pixel_values[0, 0, 0, 0] += 1.0
    assert features_key(model, changed) != key
    changed = data.subset(list(range(len(data))))
    changed.labels[0] = (changed.labels[0] + 1) % 7
    assert features_key(model, changed) != key
    with torch.no_grad():
        next(model.image_tower.parameters()).add_(1e-3)
    assert features_key(model, data) != key
