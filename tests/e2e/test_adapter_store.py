"""The participant's stored global adapter: the durable write runs in the background, a reload
sees exactly what was stored, and a kill between the two renames is completed, not fatal."""

from __future__ import annotations

import json

import numpy as np
import pytest

from secfed.errors import ModelError
from secfed.federation.plan import model_settings_for
from secfed.participant.adapter import SyntheticSite

DIM = 1000


def _site(root, dim: int = DIM) -> SyntheticSite:
    return SyntheticSite(root, "energy-utility", model_settings_for(model_dir=None,
                                                                    synthetic_dim=dim))


def test_store_returns_hash_at_once_and_flush_puts_it_on_disk(tmp_path) -> None:
    site = _site(tmp_path)
    vec = np.linspace(-1, 1, DIM, dtype=np.float32)
    digest = site.apply(vec, 3)
    assert digest == site.hash_of(vec) == site.global_hash()
    np.testing.assert_array_equal(site.global_vector(), vec)  # in memory at once
    site.flush()
    np.testing.assert_array_equal(np.fromfile(tmp_path / "adapter.f32", dtype="<f4"), vec)
    assert json.loads((tmp_path / "adapter.json").read_text()) == {"hash": digest, "round": 3}
    assert not list(tmp_path.glob("*.tmp"))
    again = _site(tmp_path)
    assert again.global_hash() == digest and again._store.applied_round == 3


def test_consecutive_stores_land_in_order(tmp_path) -> None:
    site = _site(tmp_path)
    vecs = [np.full(DIM, k, np.float32) for k in range(1, 6)]
    for k, vec in enumerate(vecs, start=1):
        site.apply(vec, k)  # each waits for the previous write, none is lost or reordered
    site.flush()
    assert _site(tmp_path).global_hash() == site.hash_of(vecs[-1])
    assert json.loads((tmp_path / "adapter.json").read_text())["round"] == 5


def test_kill_between_renames_rolls_forward(tmp_path) -> None:
    site = _site(tmp_path)
    old, new = np.full(DIM, 1, np.float32), np.full(DIM, 2, np.float32)
    site.apply(old, 1)
    site.flush()
    # the state a kill after the data rename and before the metadata rename leaves behind
    new.astype("<f4").tofile(tmp_path / "adapter.f32")
    (tmp_path / "adapter.json.tmp").write_text(
        json.dumps({"hash": site.hash_of(new), "round": 2}))
    back = _site(tmp_path)
    assert back.global_hash() == site.hash_of(new) and back._store.applied_round == 2
    assert json.loads((tmp_path / "adapter.json").read_text())["round"] == 2
    assert not (tmp_path / "adapter.json.tmp").exists()


def test_kill_before_data_rename_keeps_the_old_adapter(tmp_path) -> None:
    site = _site(tmp_path)
    old, new = np.full(DIM, 1, np.float32), np.full(DIM, 2, np.float32)
    site.apply(old, 1)
    site.flush()
    new.astype("<f4").tofile(tmp_path / "adapter.f32.tmp")  # written, never renamed
    (tmp_path / "adapter.json.tmp").write_text(
        json.dumps({"hash": site.hash_of(new), "round": 2}))
    back = _site(tmp_path)
    assert back.global_hash() == site.hash_of(old) and back._store.applied_round == 1


def test_data_that_matches_no_metadata_is_refused(tmp_path) -> None:
    site = _site(tmp_path)
    site.apply(np.full(DIM, 1, np.float32), 1)
    site.flush()
    np.full(DIM, 7, np.float32).tofile(tmp_path / "adapter.f32")
    with pytest.raises(ModelError, match="must match its recorded hash"):
        _site(tmp_path)


def test_a_failed_write_is_raised_by_flush(tmp_path) -> None:
    site = _site(tmp_path)
    (tmp_path / "adapter.f32").mkdir()  # the rename onto it fails
    site.apply(np.full(DIM, 1, np.float32), 1)
    with pytest.raises(ModelError, match="writing the adapter failed"):
        site.flush()
    site.flush()  # reported once
