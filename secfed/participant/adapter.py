"""What the ``join`` loop trains and updates: the local site's adapter.

:class:`LocalSite` is the small interface the loop needs (current global adapter, train one
round with DP, apply an aggregate, evaluate). :class:`ModelSite` is the real one (a LoRA
classifier from a model directory, DP-SGD from :mod:`secfed.training`); :class:`SyntheticSite`
stands in for it in transport tests and benchmarks: its "update" is a deterministic vector per
(enterprise, round), so a test can recompute the plaintext FedAvg independently.

The current global adapter is kept on disk (``<kit>/adapter.f32`` + its hash) so a restarted
participant continues from the last applied round.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from secfed.config import ModelSettings, RoundTerms
from secfed.errors import ConfigError, ModelError
from secfed.names import FEATURE_SCOPES, synthetic_layout_digest, vector_hash

__all__ = [
    "TrainOutcome",
    "LocalSite",
    "SyntheticSite",
    "ModelSite",
    "synthetic_update",
    "synthetic_training",
    "synthetic_layout_digest",
    "vector_hash",
]

SYNTHETIC_NORM = 1.0  # L2 norm of a synthetic delta: well inside the default clip bound of 8


@dataclass(frozen=True)
class TrainOutcome:
    """One round of local training: the update and the DP mechanism that produced it."""

    delta: np.ndarray  # float32, layout order
    noise_multiplier: float
    sample_rate: float
    steps: int
    metrics: dict[str, float]


class LocalSite(Protocol):
    """The join loop's view of the local model."""

    def global_vector(self) -> np.ndarray: ...
    def global_hash(self) -> str: ...
    def hash_of(self, vec: np.ndarray) -> str: ...
    def train(self, terms: RoundTerms) -> TrainOutcome: ...
    def apply(self, new_global: np.ndarray, round_number: int = 0) -> str: ...
    def previous(self) -> tuple[str, int, int] | None: ...
    def roll_back(self) -> str: ...
    def flush(self) -> None: ...
    def evaluate(self) -> dict[str, float]: ...


def synthetic_update(enterprise_id: str, round_number: int, dim: int) -> np.ndarray:
    """Deterministic test update (not a secret: numpy's generator is fine for test data)."""
    seed = int.from_bytes(
        hashlib.sha256(f"{enterprise_id}/{round_number}".encode()).digest()[:8], "big"
    )
    rng = np.random.default_rng(seed)
    vec = rng.uniform(-1.0, 1.0, dim)
    return (vec * (SYNTHETIC_NORM / np.linalg.norm(vec))).astype(np.float32)


class _StoredAdapter:
    """The global adapter vector persisted in the kit.

    :meth:`store` updates the vector in memory, returns its hash and writes it to disk in a
    background thread (fsync'd, then atomically renamed), so the durable write overlaps the
    confirmation the participant sends next instead of delaying it; :meth:`flush` waits for the
    write (the join loop calls it before the round is recorded as done). A process killed
    before the write completes restarts from the previous adapter and catches the round up from
    the coordinator's stored aggregate, checked against the hash its survivors signed.

    The data file is replaced before its metadata; a crash between the two renames leaves the
    new metadata at ``adapter.json.tmp``, which :meth:`__init__` completes (roll forward) when
    it matches the data file.

    Each store also keeps the adapter it replaces (``adapter.prev.f32`` + ``adapter.prev.json``:
    its hash, its round and the round that replaced it; a hard link to the old data file where
    the file system allows one), overwritten by the next store: a site that applied a round the
    coordinator then aborted at its confirmation stage returns to it with :meth:`roll_back`
    (the join loop decides when). :meth:`previous` offers it only while it is exactly the
    adapter the current one replaced and its data still match its recorded hash.
    """

    def __init__(self, root: Path, layout_digest: bytes, initial: np.ndarray, initial_hash: str):
        self._path = root / "adapter.f32"
        self._meta = root / "adapter.json"
        self._prev_path = root / "adapter.prev.f32"
        self._prev_meta = root / "adapter.prev.json"
        self._digest = layout_digest
        self._writer: threading.Thread | None = None
        self._write_error: BaseException | None = None
        if self._path.is_file() and self._meta.is_file():
            vec = np.fromfile(self._path, dtype="<f4")
            meta = self._read_meta(vec)
            self.vector = vec.astype(np.float32)
            self.applied_round = int(meta.get("round", 0))
        else:
            if vector_hash(layout_digest, initial) != initial_hash:
                raise ConfigError(
                    "model.initial_global_hash must equal the local model's adapter hash "
                    "(the kit was made for another model)"
                )
            self.vector = initial.astype(np.float32)
            self.applied_round = 0

    def _read_meta(self, vec: np.ndarray) -> dict[str, Any]:
        digest = vector_hash(self._digest, vec)
        meta: dict[str, Any] = json.loads(self._meta.read_text())
        if meta.get("hash") == digest:
            return meta
        pending = _pending(self._meta)
        if pending.is_file():  # killed between the two renames: finish the second one
            newer: dict[str, Any] = json.loads(pending.read_text())
            if newer.get("hash") == digest:
                os.replace(pending, self._meta)
                return newer
        raise ModelError(f"{self._path}: stored adapter must match its recorded hash")

    def hash(self) -> str:
        return vector_hash(self._digest, self.vector)

    def hash_of(self, vec: np.ndarray) -> str:
        return vector_hash(self._digest, vec)

    def store(self, vec: np.ndarray, round_number: int, *, keep_previous: bool = True) -> str:
        """Make ``vec`` the current adapter; returns its hash. The disk write runs in the
        background (:meth:`flush` waits for it). ``keep_previous``: keep the adapter it replaces
        for :meth:`roll_back` (off for the roll-back itself: the undone one is not kept)."""
        self.flush()  # one write at a time, in order
        previous: tuple[bytes, bytes] | None = None
        if keep_previous:
            old = np.ascontiguousarray(self.vector, dtype="<f4").tobytes()
            previous = (old, json.dumps({"hash": self.hash(), "round": self.applied_round,
                                         "replaced_by": round_number}).encode())
        data = np.ascontiguousarray(vec, dtype="<f4").tobytes()
        self.vector = np.frombuffer(data, dtype="<f4").astype(np.float32)
        self.applied_round = round_number
        digest = vector_hash(self._digest, self.vector)
        meta = json.dumps({"hash": digest, "round": round_number}).encode()
        self._writer = threading.Thread(target=self._write, args=(data, meta, previous),
                                        daemon=False, name="secfed-adapter-write")
        self._writer.start()
        return digest

    def _write(self, data: bytes, meta: bytes, previous: tuple[bytes, bytes] | None) -> None:
        try:
            tmp, tmp_meta = _pending(self._path), _pending(self._meta)
            for path, content in ((tmp, data), (tmp_meta, meta)):
                _write_synced(path, content)
            if previous is not None:
                self._keep_previous(*previous)
            os.replace(tmp, self._path)
            os.replace(tmp_meta, self._meta)
            dir_fd = os.open(self._path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)  # the renames survive a power loss too
            finally:
                os.close(dir_fd)
        except BaseException as exc:  # handed to the caller by flush()
            self._write_error = exc

    def _keep_previous(self, old: bytes, meta: bytes) -> None:
        """Put the adapter about to be replaced at ``adapter.prev.*`` (data, then metadata;
        a crash between leaves a pair whose hashes differ, which :meth:`previous` ignores)."""
        tmp, tmp_meta = _pending(self._prev_path), _pending(self._prev_meta)
        tmp.unlink(missing_ok=True)
        linked = False
        if self._path.is_file():  # the old data file: the same bytes, nothing to copy
            try:
                os.link(self._path, tmp)
                linked = True
            except OSError:  # no hard links here: write the bytes instead
                pass
        if not linked:
            _write_synced(tmp, old)
        _write_synced(tmp_meta, meta)
        os.replace(tmp, self._prev_path)
        os.replace(tmp_meta, self._prev_meta)

    def previous(self) -> tuple[str, int, int] | None:
        """The adapter the current one replaced, as (hash, its round, the round that replaced
        it), or None: none kept, already rolled back to, or its data do not match its hash."""
        self.flush()
        try:
            meta = json.loads(self._prev_meta.read_text())
            vec = np.fromfile(self._prev_path, dtype="<f4")
            kept = (str(meta["hash"]), int(meta["round"]), int(meta["replaced_by"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if kept[2] != self.applied_round or vec.size != self.vector.size:
            return None
        return kept if vector_hash(self._digest, vec) == kept[0] else None

    def roll_back(self) -> str:
        """Make the adapter the current one replaced current again (durably); its hash.

        Raises:
            ModelError: no previous adapter is kept (see :meth:`previous`).
        """
        kept = self.previous()
        if kept is None:
            raise ModelError(f"{self._prev_path}: no previous adapter to roll back to")
        vec = np.fromfile(self._prev_path, dtype="<f4")
        digest = self.store(vec, kept[1], keep_previous=False)
        self.flush()
        return digest

    def flush(self) -> None:
        """Wait until the last stored adapter is on disk; re-raises a failed write."""
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        if self._write_error is not None:
            exc, self._write_error = self._write_error, None
            raise ModelError(f"{self._path}: writing the adapter failed ({exc})") from exc


def _pending(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def _write_synced(path: Path, content: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(content)
        fh.flush()
        os.fsync(fh.fileno())


def synthetic_training(seconds: float) -> None:
    """Keep the CPU busy for ``seconds`` with float32 matrix products (they release the GIL,
    as torch training does): the stand-in for local training in benches and tests."""
    work = np.ones((256, 256), np.float32)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        work = (work @ work) * np.float32(1.0 / 256)


class StoreBacked:
    """The global adapter's half of a :class:`LocalSite`, kept in ``self._store`` (a
    :class:`_StoredAdapter`): read, hash, apply, keep the previous one, roll back, flush.
    :meth:`_loaded` hands each new current vector to whatever trains on it."""

    _store: _StoredAdapter

    def global_vector(self) -> np.ndarray:
        return self._store.vector

    def global_hash(self) -> str:
        return self._store.hash()

    def hash_of(self, vec: np.ndarray) -> str:
        return self._store.hash_of(vec)

    def apply(self, new_global: np.ndarray, round_number: int = 0) -> str:
        digest = self._store.store(new_global, round_number)
        self._loaded()
        return digest

    def previous(self) -> tuple[str, int, int] | None:
        return self._store.previous()

    def roll_back(self) -> str:
        """Back to the adapter the last apply replaced (the coordinator aborted that round);
        it is handed on through :meth:`_loaded` like any new global vector."""
        digest = self._store.roll_back()
        self._loaded()
        return digest

    def flush(self) -> None:
        self._store.flush()

    def _loaded(self) -> None:
        """The current vector changed (apply or roll back); nothing to do by default."""


class SyntheticSite(StoreBacked):
    """A stand-in site for transport tests and benchmarks (no model, no data).

    ``train_seconds`` keeps the CPU busy that long per round (float32 matrix products, which
    release the GIL like torch does), standing in for local training time.
    """

    def __init__(self, kit_root: Path, enterprise_id: str, settings: ModelSettings,
                 *, train_seconds: float = 0.0):
        self.enterprise_id = enterprise_id
        self.train_seconds = train_seconds
        dim = settings.vector_length
        self._store = _StoredAdapter(
            kit_root, synthetic_layout_digest(dim), np.zeros(dim, np.float32),
            settings.initial_global_hash,
        )

    def train(self, terms: RoundTerms) -> TrainOutcome:
        synthetic_training(self.train_seconds)
        delta = synthetic_update(self.enterprise_id, terms.round_number, self._store.vector.size)
        return TrainOutcome(delta, terms.noise_multiplier, terms.sample_rate, terms.local_steps, {})

    def evaluate(self) -> dict[str, float]:
        return {}


class ModelSite(StoreBacked):
    """The real site: a LoRA model from ``model_dir`` (a classifier or a generative LM) trained
    with DP-SGD on ``data_dir``."""

    def __init__(
        self,
        kit_root: Path,
        enterprise_id: str,
        settings: ModelSettings,
        *,
        model_dir: Path,
        data_dir: Path,
        test_dir: Path | None = None,
    ):
        from secfed.models import adapter_layout, get_flat

        self.enterprise_id = enterprise_id
        from secfed.models.scopes import load_for_scope

        self.model = load_for_scope(model_dir, settings.trainable)
        self.layout = adapter_layout(self.model)
        if self.layout.total != settings.vector_length:
            raise ConfigError(
                f"model.vector_length must equal the model's adapter size {self.layout.total} "
                f"(got {settings.vector_length}; trainable set {settings.trainable!r})"
            )
        self.dataset = _load_data(data_dir, model_dir)
        self.test = _load_data(test_dir, model_dir) if test_dir else None
        #: tokenising counts of a generative dataset (records, truncated, without_target)
        self.data_stats = getattr(self.dataset, "stats", None)
        if settings.trainable in FEATURE_SCOPES:
            # Towers frozen: their outputs never change, so compute them once and train the
            # head on them -- the same per-example gradients, without re-running the towers.
            # Kept under the kit (keyed by the towers' weights and the records' inputs), so a
            # restarted site reads them back instead of running the towers again.
            from secfed.models.features import (
                FeatureDataset,
                cached_tower_features,
                feature_classifier,
            )
            from secfed.models.scopes import select_trainable

            cache = Path(kit_root) / "features"
            self.dataset = FeatureDataset(
                cached_tower_features(self.model, self.dataset, cache, name="train"))
            if self.test is not None:
                self.test = FeatureDataset(
                    cached_tower_features(self.model, self.test, cache, name="test"))
            head = feature_classifier(self.model)
            select_trainable(head, settings.trainable)
            if adapter_layout(head).digest() != self.layout.digest():
                raise ModelError("the feature head's layout differs from the model's")
            self.model, self.layout = head, adapter_layout(head)
        self._store = _StoredAdapter(
            kit_root, self.layout.digest(), get_flat(self.model, self.layout),
            settings.initial_global_hash,
        )
        self._set(self._store.vector)

    def _set(self, vec: np.ndarray) -> None:
        from secfed.models import set_flat

        set_flat(self.model, self.layout, vec)

    def train(self, terms: RoundTerms) -> TrainOutcome:
        from secfed.training import DPConfig, train_local

        self._set(self._store.vector)
        result = train_local(self.model, self.dataset, config=DPConfig.of(terms.dp_sgd))
        self._set(self._store.vector)  # the update leaves only through the protocol
        return TrainOutcome(
            np.asarray(result.delta, dtype=np.float32),
            float(result.noise_multiplier),
            float(result.sample_rate),
            int(result.steps),
            {"train_loss": float(result.mean_loss), **self._data_counts()},
        )

    def _data_counts(self) -> dict[str, float]:
        """A generative dataset's tokenising counts (local report only: never sent)."""
        stats = self.data_stats
        if stats is None:
            return {}
        return {"records": float(stats.records), "records_truncated": float(stats.truncated),
                "records_without_target": float(stats.without_target)}

    def _loaded(self) -> None:
        self._set(self._store.vector)

    def evaluate(self) -> dict[str, float]:
        if self.test is None:
            return {}
        from secfed.training import evaluate

        out = evaluate(self.model, self.test)
        keep = ("accuracy", "loss", "perplexity")
        return {k: float(out[k]) for k in keep if k in out}


def _load_data(data_dir: Path, model_dir: Path):
    """The dataset of ``data_dir`` tokenised for ``model_dir``'s task: an instruction dataset
    for a generative model, an image/text classification dataset otherwise."""
    from secfed.models import GENERATIVE_TASKS, task_of

    if task_of(model_dir) in GENERATIVE_TASKS:
        from secfed.data.instructions import load_instruction_dataset

        return load_instruction_dataset(data_dir, model_dir=model_dir)
    from secfed.data import load_dataset  # torch-heavy: import on use

    return load_dataset(data_dir, model_dir=model_dir)
