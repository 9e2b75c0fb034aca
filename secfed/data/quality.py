"""Data-quality checks with the model's own towers, run locally at a site (``secfed data check``).

The model's text tower (MiniLM) and image tower (ViT) embed every record. Then:

* exact duplicates: identical image bytes and identical text;
* near duplicates: 16x16 thumbnails almost identical (cosine; the generic ViT does not tell a
  re-encoded copy from a similar frame) and texts almost identical (MiniLM cosine, or
  character-level similarity for typo'd copies), or both absent;
* likely mislabels: out-of-fold softmax probes on the tower embeddings (confident learning:
  a record's own label never trains the probe that judges it) put little probability on the
  given label and much on another class -- the text probe where a text exists, the image probe
  under stricter thresholds otherwise;
* image/text mismatches: the text probe confidently names another class while the image probe
  supports the given label;
* missing modalities and class balance.

``write_cleaned`` copies a dataset without the flagged records; the original is never touched.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from dataclasses import asdict, dataclass, field
from difflib import SequenceMatcher
from pathlib import Path

import numpy as np
import torch

from secfed.crypto.errors import DataError
from secfed.data.loading import CitySafetyDataset, load_dataset, model_inputs
from secfed.data.records import IMAGES_DIR, DatasetMeta, read_meta, write_records

__all__ = [
    "Embeddings",
    "QualityReport",
    "QualitySettings",
    "check_dataset",
    "embed_dataset",
    "find_defects",
    "score_against_truth",
    "write_cleaned",
]


@dataclass(frozen=True)
class QualitySettings:
    """Thresholds of the checks (cosine / character similarities, probe probabilities)."""

    # thumbnail cosine for image copies; with a near-identical text a looser image bound
    near_duplicate_image: float = 0.95
    near_duplicate_image_with_text: float = 0.8
    near_duplicate_text: float = 0.97
    near_duplicate_text_only: float = 0.99
    near_duplicate_text_chars: float = 0.9
    # likely mislabel: out-of-fold probability of the given label at most this, of another
    # class at least ``mislabel_confidence``
    mislabel_own_probability: float = 0.1
    mislabel_confidence: float = 0.5
    # records without text: the image probe must be far more certain
    image_only_own_probability: float = 0.03
    image_only_confidence: float = 0.7
    # mismatch: the text probe names another class this confidently and the image probe
    # supports the given label at least as much as the text's class
    mismatch_text_confidence: float = 0.6
    folds: int = 5
    probe_seed: int = 0
    weight_decay: float = 0.1


@dataclass
class Embeddings:
    """L2-normalised tower embeddings; rows of a missing modality are zero, flags say which."""

    text: np.ndarray
    image: np.ndarray
    thumbnail: np.ndarray
    text_present: np.ndarray
    image_present: np.ndarray


@dataclass
class QualityReport:
    """What :func:`find_defects` found, by record id."""

    records: int
    class_balance: dict[str, int]
    missing_text: list[str] = field(default_factory=list)
    missing_image: list[str] = field(default_factory=list)
    exact_duplicates: list[dict] = field(default_factory=list)
    near_duplicates: list[dict] = field(default_factory=list)
    mislabels: list[dict] = field(default_factory=list)
    mismatches: list[dict] = field(default_factory=list)

    def flagged(self) -> set[str]:
        """Ids that ``--fix`` drops: the later copy of each duplicate, mislabels, mismatches."""
        out = {d["id"] for d in self.exact_duplicates + self.near_duplicates}
        out |= {m["id"] for m in self.mislabels} | {m["id"] for m in self.mismatches}
        return out

    def summary(self) -> dict[str, int]:
        return {"records": self.records, "missing_text": len(self.missing_text),
                "missing_image": len(self.missing_image),
                "exact_duplicates": len(self.exact_duplicates),
                "near_duplicates": len(self.near_duplicates),
                "mislabels": len(self.mislabels), "mismatches": len(self.mismatches)}

    def to_json(self) -> dict:
        out = asdict(self)
        out["summary"] = self.summary()
        return out


@torch.no_grad()
def embed_dataset(model: torch.nn.Module, dataset: CitySafetyDataset, *,
                  batch_size: int = 64) -> Embeddings:
    """Embed each record with the classifier's text and image towers (mean / CLS pooled)."""
    towers = model.towers()
    text_tower, image_tower = towers["text"], towers["image"]
    was_training = model.training
    model.eval()
    texts, images = [], []
    for start in range(0, len(dataset), batch_size):
        sl = slice(start, start + batch_size)
        mask = dataset.attention_mask[sl]
        hidden = text_tower(input_ids=dataset.input_ids[sl], attention_mask=mask).last_hidden_state
        w = mask.unsqueeze(-1).to(hidden.dtype)
        texts.append(((hidden * w).sum(1) / w.sum(1).clamp(min=1.0)).numpy())
        img_hidden = image_tower(pixel_values=dataset.pixel_values[sl]).last_hidden_state
        images.append(torch.cat([img_hidden[:, 0], img_hidden[:, 1:].mean(1)], dim=-1).numpy())
    model.train(was_training)
    n_rows = len(dataset)
    text_present = dataset.text_present.numpy().astype(bool)
    image_present = dataset.image_present.numpy().astype(bool)
    text = _normalise(np.concatenate(texts)) * text_present[:, None]
    image = _normalise(np.concatenate(images)) * image_present[:, None]
    thumbs = np.stack([_thumbnail(f) for f in dataset.frames]) if n_rows else np.zeros((0, 1))
    thumbnail = _unit_rows(thumbs) * image_present[:, None]
    return Embeddings(text=text.astype(np.float32), image=image.astype(np.float32),
                      thumbnail=thumbnail.astype(np.float32), text_present=text_present,
                      image_present=image_present)


def _thumbnail(frame: np.ndarray) -> np.ndarray:
    """A 16x16 box-filtered copy, brightness-centred: a perceptual embedding for copies."""
    from PIL import Image

    small = np.asarray(Image.fromarray(frame).resize((16, 16), Image.Resampling.BOX), np.float32)
    return (small - small.mean()).ravel()


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True).clip(min=1e-12)


def _normalise(x: np.ndarray) -> np.ndarray:
    return _unit_rows(x - x.mean(axis=0, keepdims=True))  # centring spreads cosines out


def _out_of_fold_probs(x: np.ndarray, labels: np.ndarray, n_classes: int, *, folds: int,
                       seed: int, weight_decay: float) -> np.ndarray:
    """Class probabilities of each row from a softmax probe trained on the other folds.

    Confident learning (Northcutt et al., JAIR 2021): a record's own label never votes for
    itself, so a wrong label shows up as a low out-of-fold probability.
    """
    n = len(labels)
    probs = np.full((n, n_classes), 1.0 / n_classes)
    if n < folds * 2:
        return probs
    order = np.random.default_rng(seed).permutation(n)  # data shuffling only, not a secret
    xt = torch.from_numpy(x.astype(np.float32))
    yt = torch.from_numpy(labels.astype(np.int64))
    for f in range(folds):
        held = order[f::folds]
        train = np.setdiff1d(order, held)
        mu = xt[train].mean(0)
        sd = xt[train].std(0).clamp(min=1e-6)
        xtr = (xt[train] - mu) / sd
        probe = _fit_probe(xtr, yt[train], n_classes, weight_decay=weight_decay)
        with torch.no_grad():
            probs[held] = torch.softmax(probe((xt[held] - mu) / sd), -1).numpy()
    return probs


def _fit_probe(x: torch.Tensor, y: torch.Tensor, n_classes: int, *,
               weight_decay: float) -> torch.nn.Linear:
    """A softmax regression fitted by L-BFGS with an L2 penalty."""
    probe = torch.nn.Linear(x.shape[1], n_classes)
    opt = torch.optim.LBFGS(probe.parameters(), lr=0.5, max_iter=30,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(probe(x), y) + (
            weight_decay * probe.weight.pow(2).sum())
        loss.backward()
        return loss

    opt.step(closure)
    return probe


def find_defects(dataset: CitySafetyDataset, emb: Embeddings,
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
        missing_text=[r.id for r, p in zip(records, emb.text_present) if not p],
        missing_image=[r.id for r, p in zip(records, emb.image_present) if not p],
    )
    # --- exact duplicates: same image bytes and same text
    first_seen: dict[bytes, int] = {}
    duplicate_of = np.full(n, -1)
    for i, r in enumerate(records):
        h = hashlib.sha256()
        if r.image is not None:
            h.update(hashlib.sha256((dataset.data_dir / r.image).read_bytes()).digest())
        h.update(b"\x00" + (r.text or "").strip().encode("utf-8"))
        key = h.digest()
        if key in first_seen:
            duplicate_of[i] = first_seen[key]
            report.exact_duplicates.append({"id": r.id,
                                            "duplicate_of": records[first_seen[key]].id})
        else:
            first_seen[key] = i
    # --- near duplicates: both modalities nearly identical (absent on both sides counts)
    sim_text = emb.text @ emb.text.T
    sim_thumb = emb.thumbnail @ emb.thumbnail.T
    tp, ip = emb.text_present, emb.image_present
    both_text = tp[:, None] & tp[None, :]
    both_image = ip[:, None] & ip[None, :]
    same_text = both_text & (sim_text >= s.near_duplicate_text)
    # typo'd copies: MiniLM moves more than a character edit does, so for image copies also
    # accept texts whose character-level similarity is high
    for i, j in zip(*np.nonzero(np.triu(both_text & both_image & (
            sim_thumb >= s.near_duplicate_image) & ~same_text, 1))):
        ratio = SequenceMatcher(None, records[i].text or "", records[j].text or "").ratio()
        if ratio >= s.near_duplicate_text_chars:
            same_text[i, j] = same_text[j, i] = True
    near = (both_image & (sim_thumb >= s.near_duplicate_image) & (same_text | ~both_text)
            & (tp[:, None] == tp[None, :]))
    near |= both_image & same_text & (sim_thumb >= s.near_duplicate_image_with_text)
    near |= ~ip[:, None] & ~ip[None, :] & both_text & (sim_text >= s.near_duplicate_text_only)
    np.fill_diagonal(near, False)
    for i in range(n):
        if duplicate_of[i] >= 0:
            continue
        earlier = np.flatnonzero(near[i, :i] & (duplicate_of[:i] < 0))
        if earlier.size:
            j = int(earlier[np.argmax(sim_thumb[i, earlier] + sim_text[i, earlier])])
            duplicate_of[i] = j
            report.near_duplicates.append({
                "id": records[i].id, "duplicate_of": records[j].id,
                "image_similarity": round(float(sim_thumb[i, j]), 4),
                "text_similarity": round(float(sim_text[i, j]), 4)})
    # --- out-of-fold probes: text alone, image alone, both (duplicates left out of training)
    keep = np.flatnonzero(duplicate_of < 0)
    n_classes = len(names)
    probes = {}
    joint = np.concatenate([emb.text, emb.image, tp[:, None], ip[:, None]], axis=1)
    for name, x, present in (("text", emb.text, tp), ("image", emb.image, ip),
                             ("joint", joint, np.ones(n, bool))):
        rows = keep[present[keep]]
        p = np.full((n, n_classes), 1.0 / n_classes)
        if len(rows):
            p[rows] = _out_of_fold_probs(x[rows], labels[rows], n_classes, folds=s.folds,
                                         seed=s.probe_seed, weight_decay=s.weight_decay)
        probes[name] = p
    for i in keep:
        r, y = records[i], int(labels[i])
        pt, pi, pj = probes["text"][i], probes["image"][i], probes["joint"][i]
        ct = int(pt.argmax())
        if (tp[i] and ip[i] and ct != y and pt[ct] >= s.mismatch_text_confidence
                and pi[y] >= pi[ct]):
            report.mismatches.append({
                "id": r.id, "label": r.label, "text_suggests": names[ct],
                "text_confidence": round(float(pt[ct]), 3),
                "image_support_for_label": round(float(pi[y]), 3)})
            continue
        # the text probe is the competent one where a text exists; image-only records are
        # judged by the image probe under the same thresholds (it is rarely that confident)
        pm = pt if tp[i] else (pi if ip[i] else pj)
        own, conf = ((s.mislabel_own_probability, s.mislabel_confidence) if tp[i] else
                     (s.image_only_own_probability, s.image_only_confidence))
        best = int(pm.argmax())
        if best != y and pm[y] <= own and pm[best] >= conf:
            report.mislabels.append({"id": r.id, "given_label": r.label,
                                     "suggested_label": names[best],
                                     "confidence": round(float(pm[best]), 3)})
    return report


def check_dataset(data_dir: Path | str, *, model_dir: Path | str,
                  settings: QualitySettings | None = None, model=None) -> tuple[
                      QualityReport, CitySafetyDataset]:
    """Load ``data_dir`` for the classifier in ``model_dir``, embed it and run every check.

    Raises:
        DataError: the dataset is malformed. ModelError: the model directory is unusable.
    """
    if model is None:
        from secfed.models.storage import load_classifier

        model, _ = load_classifier(model_dir)
    dataset = load_dataset(data_dir, inputs=model_inputs(model_dir))
    return find_defects(dataset, embed_dataset(model, dataset), settings), dataset


def write_cleaned(data_dir: Path | str, out_dir: Path | str, report: QualityReport) -> Path:
    """Copy ``data_dir`` to ``out_dir`` without the records ``report`` flags.

    The original directory is only read. Returns ``out_dir``.

    Raises:
        DataError: ``out_dir`` is the original, lies inside it, or is not empty.
    """
    from secfed.data.records import read_records

    src, dst = Path(data_dir).resolve(), Path(out_dir).resolve()
    if dst == src or dst.is_relative_to(src) or src.is_relative_to(dst):
        raise DataError(f"out must be a directory outside the dataset (got {str(out_dir)!r} "
                        f"for data {str(data_dir)!r})")
    if dst.exists() and any(dst.iterdir()):
        raise DataError(f"out must be empty or absent (got non-empty {str(out_dir)!r})")
    meta, records = read_records(src)
    drop = report.flagged()
    kept = [r for r in records if r.id not in drop]
    (dst / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    for r in kept:
        if r.image is not None:
            target = dst / r.image
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / r.image, target)
    cleaned_meta = DatasetMeta(taxonomy=meta.taxonomy, enterprise=meta.enterprise,
                               seed=meta.seed, scale=meta.scale)
    write_records(dst, kept, cleaned_meta)
    (dst / "quality_report.json").write_text(json.dumps(report.to_json(), indent=1,
                                                        sort_keys=True) + "\n")
    return dst


def score_against_truth(report: QualityReport, truth: dict) -> dict[str, dict[str, float]]:
    """Precision and recall of each check against a generator's defect truth file."""

    def pr(found: set, expected: set) -> dict[str, float]:
        hit = len(found & expected)
        return {"precision": hit / len(found) if found else 1.0,
                "recall": hit / len(expected) if expected else 1.0,
                "found": len(found), "expected": len(expected)}

    dup_found = {frozenset((d["id"], d["duplicate_of"]))
                 for d in report.exact_duplicates + report.near_duplicates}
    dup_truth = {frozenset((d["id"], d["duplicate_of"])) for d in truth["duplicates"]}
    return {
        "duplicates": pr(dup_found, dup_truth),
        "mislabels": pr({m["id"] for m in report.mislabels}, {m["id"] for m in truth["mislabels"]}),
        "mismatches": pr({m["id"] for m in report.mismatches},
                         {m["id"] for m in truth["mismatches"]}),
    }


def read_dataset_meta(data_dir: Path | str) -> DatasetMeta:
    """``meta.json`` of a dataset (re-exported for the CLI)."""
    return read_meta(Path(data_dir))
