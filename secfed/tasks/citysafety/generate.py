"""Deterministic generation of the city-safety federation from one seed.

``generate_federation(out, seed=...)`` writes one dataset directory per enterprise, a shared
clean held-out ``test/`` set covering every class, and ``truth/<enterprise>.json`` with the
injected defects (duplicates, wrong labels, image/text mismatches) kept outside the datasets.
numpy's Generator is used for *data* only (never for keys, masks or seeds of secrets).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from secfed.data.records import IMAGES_DIR, DatasetMeta, Record, write_json, write_records
from secfed.errors import DataError
from secfed.tasks.citysafety.reports import edit_report, write_report
from secfed.tasks.citysafety.scenes import perturb_frame, render_scene
from secfed.tasks.citysafety.taxonomy import (
    ENTERPRISES,
    HAZARD_CLASSES,
    HAZARD_DESCRIPTIONS,
    SCALES,
    TAXONOMY_VERSION,
    TEST_PER_CLASS,
    EnterpriseProfile,
)

#: Fractions of injected defects (of the clean records of an enterprise).
MISLABEL_RATE = 0.10
MISMATCH_RATE = 0.04
DUPLICATE_RATE = 0.06
TEST_TEXT_MISSING = 0.2
TEST_DIR = "test"
TRUTH_DIR = "truth"


@dataclass(frozen=True)
class FederationData:
    """Where :func:`generate_federation` put things, and how many records each holds."""

    root: Path
    seed: int
    scale: str
    enterprises: dict[str, Path]
    test_dir: Path
    truth_dir: Path
    counts: dict[str, int] = field(default_factory=dict)

    def truth_path(self, enterprise: str) -> Path:
        return self.truth_dir / f"{enterprise}.json"


@dataclass
class _Draft:
    label: str  # the label written to disk
    text: str | None
    frame: np.ndarray | None
    true_label: str
    defect: str | None = None
    text_label: str | None = None
    duplicate_of: int | None = None


def _png_bytes(frame: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(frame, mode="RGB").save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def _class_counts(weights: tuple[float, ...], n: int) -> list[int]:
    w = np.asarray(weights, dtype=np.float64)
    raw = w / w.sum() * n
    counts = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - counts), kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    return [int(max(c, 1)) for c in counts]


def _draft_record(profile: EnterpriseProfile, label: str, rng: np.random.Generator,
                  *, text_missing: float, image_missing: float) -> _Draft:
    frame = render_scene(label, rng, night_fraction=profile.night_fraction, tint=profile.tint)
    text = write_report(profile.name, label, rng)
    u = rng.random()
    if u < text_missing:
        text = None
    elif u < text_missing + image_missing:
        frame = None
    return _Draft(label=label, text=text, frame=frame, true_label=label)


def _inject_defects(profile: EnterpriseProfile, drafts: list[_Draft],
                    rng: np.random.Generator) -> list[_Draft]:
    n = len(drafts)
    order = rng.permutation(n)
    n_mislabel = int(round(MISLABEL_RATE * n))
    both = [i for i in order if drafts[i].text is not None and drafts[i].frame is not None]
    mislabelled = [int(i) for i in order[:n_mislabel]]
    taken = set(mislabelled)
    mismatch_pool = [i for i in both if i not in taken]
    n_mismatch = min(int(round(MISMATCH_RATE * n)), len(mismatch_pool))
    mismatched = [int(i) for i in mismatch_pool[:n_mismatch]]
    taken |= set(mismatched)
    for i in mislabelled:
        d = drafts[i]
        wrong = [c for c in HAZARD_CLASSES if c != d.true_label]
        d.label = str(rng.choice(wrong))
        d.defect = "mislabel"
    for i in mismatched:
        d = drafts[i]
        other = str(rng.choice([c for c in HAZARD_CLASSES if c != d.true_label]))
        d.text = write_report(profile.name, other, rng)
        d.text_label = other
        d.defect = "mismatch"
    clean = [int(i) for i in order if int(i) not in taken]
    n_dup = int(round(DUPLICATE_RATE * n))
    sources = rng.choice(clean, size=min(n_dup, len(clean)), replace=False)
    copies = []
    for k, src in enumerate(sources):
        s = drafts[int(src)]
        exact = k % 2 == 0
        if exact:
            frame, text = s.frame, s.text
        else:
            frame = None if s.frame is None else perturb_frame(s.frame, rng)
            text = None if s.text is None else edit_report(s.text, rng)
        copies.append(_Draft(label=s.label, text=text, frame=frame, true_label=s.true_label,
                             defect="exact_duplicate" if exact else "near_duplicate",
                             duplicate_of=int(src)))
    return drafts + copies


def _write_dataset(out: Path, enterprise: str, prefix: str, drafts: list[_Draft],
                   rng: np.random.Generator, *, seed: int, scale: str,
                   sources: list[str] | None = None) -> tuple[list[Record], list[str]]:
    """Shuffle, assign ids, write PNGs + records; return the records and draft-index -> id."""
    (out / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    order = rng.permutation(len(drafts))
    ids = [""] * len(drafts)
    for pos, i in enumerate(order):
        ids[int(i)] = f"{prefix}-{pos:05d}"
    records = []
    for i in order:
        d = drafts[int(i)]
        rid = ids[int(i)]
        image = None
        if d.frame is not None:
            image = f"{IMAGES_DIR}/{rid}.png"
            (out / image).write_bytes(_png_bytes(d.frame))
        records.append(Record(id=rid, text=d.text, image=image, label=d.label,
                              source=sources[int(i)] if sources else enterprise))
    meta = DatasetMeta(taxonomy=HAZARD_CLASSES, enterprise=enterprise, seed=seed, scale=scale,
                       label_descriptions=HAZARD_DESCRIPTIONS)
    write_records(out, records, meta)
    return records, ids


def _truth(enterprise: str, drafts: list[_Draft], ids: list[str]) -> dict:
    mislabels, mismatches, duplicates = [], [], []
    for i, d in enumerate(drafts):
        if d.defect == "mislabel":
            mislabels.append({"id": ids[i], "given_label": d.label, "true_label": d.true_label})
        elif d.defect == "mismatch":
            mismatches.append({"id": ids[i], "image_label": d.true_label,
                               "text_label": d.text_label})
        elif d.defect in ("exact_duplicate", "near_duplicate"):
            assert d.duplicate_of is not None
            duplicates.append({"id": ids[i], "duplicate_of": ids[d.duplicate_of],
                               "kind": d.defect.removesuffix("_duplicate")})
    key = "id"
    return {
        "enterprise": enterprise,
        "taxonomy_version": TAXONOMY_VERSION,
        "records": len(drafts),
        "mislabels": sorted(mislabels, key=lambda r: r[key]),
        "mismatches": sorted(mismatches, key=lambda r: r[key]),
        "duplicates": sorted(duplicates, key=lambda r: r[key]),
        "missing_text": sorted(ids[i] for i, d in enumerate(drafts) if d.text is None),
        "missing_image": sorted(ids[i] for i, d in enumerate(drafts) if d.frame is None),
    }


def _write_held_out(out: Path, rng: np.random.Generator, *, seed: int, scale: str,
                    per_class: int) -> int:
    """Clean records of every class, each drawn in the style of a random enterprise."""
    drafts, sources = [], []
    for label in HAZARD_CLASSES:
        for _ in range(per_class):
            profile = ENTERPRISES[int(rng.integers(0, len(ENTERPRISES)))]
            drafts.append(_draft_record(profile, label, rng, text_missing=TEST_TEXT_MISSING,
                                        image_missing=0.05))
            sources.append(profile.name)
    _write_dataset(out, "shared-test", "test", drafts, rng, seed=seed, scale=scale,
                   sources=sources)
    return len(drafts)


def checked_out_dir(out_dir: Path | str, *, seed: int, scale: str) -> Path:
    """The output directory after checking scale, seed and that it is empty or absent."""
    if scale not in SCALES:
        raise DataError(f"scale must be one of {list(SCALES)} (got {scale!r})")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise DataError(f"seed must be a non-negative integer (got {seed!r})")
    root = Path(out_dir)
    if root.exists() and any(root.iterdir()):
        raise DataError(f"out_dir must be empty or absent (got {str(root)!r}, not empty)")
    return root


def generate_held_out(out_dir: Path | str, *, seed: int, scale: str = "demo") -> Path:
    """Write only a held-out set like the federation's ``test/`` (same size for ``scale``).

    With a seed other than the federation's it is a validation set for picking
    hyperparameters that shares no record with the test set.

    Raises:
        DataError: bad scale/seed, or ``out_dir`` is not empty.
    """
    root = checked_out_dir(out_dir, seed=seed, scale=scale)
    rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(len(ENTERPRISES) + 1)[-1])
    _write_held_out(root, rng, seed=seed, scale=scale, per_class=TEST_PER_CLASS[scale])
    return root


def generate_federation(out_dir: Path | str, *, seed: int, scale: str = "demo") -> FederationData:
    """Write the three enterprises' datasets, the shared test set and the defect truth.

    Args:
        out_dir: created if missing; must not already hold a generated federation.
        seed: the data seed; the same seed and scale give byte-identical files.
        scale: ``"tiny"`` (tests), ``"demo"`` (the 10-minute demo) or ``"full"``.

    Raises:
        DataError: bad scale/seed, or ``out_dir`` already holds datasets.
    """
    root = checked_out_dir(out_dir, seed=seed, scale=scale)
    truth_dir = root / TRUTH_DIR
    truth_dir.mkdir(parents=True, exist_ok=True)
    seeds = np.random.SeedSequence(seed).spawn(len(ENTERPRISES) + 1)
    paths: dict[str, Path] = {}
    counts: dict[str, int] = {}
    for profile, ss in zip(ENTERPRISES, seeds):
        rng = np.random.default_rng(ss)
        drafts = []
        per_class = _class_counts(profile.class_weights, profile.size(scale))
        for label, count in zip(HAZARD_CLASSES, per_class):
            for _ in range(count):
                drafts.append(_draft_record(profile, label, rng, text_missing=profile.text_missing,
                                            image_missing=profile.image_missing))
        drafts = _inject_defects(profile, drafts, rng)
        out = root / profile.name
        prefix = "".join(w[0] for w in profile.name.split("_"))
        _, ids = _write_dataset(out, profile.name, prefix, drafts, rng, seed=seed, scale=scale)
        write_json(truth_dir / f"{profile.name}.json", _truth(profile.name, drafts, ids))
        paths[profile.name] = out
        counts[profile.name] = len(drafts)
    test_dir = root / TEST_DIR
    counts[TEST_DIR] = _write_held_out(test_dir, np.random.default_rng(seeds[-1]), seed=seed,
                                       scale=scale, per_class=TEST_PER_CLASS[scale])
    write_json(root / "federation.json", {"seed": seed, "scale": scale,
                                          "taxonomy": list(HAZARD_CLASSES),
                                          "enterprises": sorted(paths), "counts": counts})
    return FederationData(root=root, seed=seed, scale=scale, enterprises=paths,
                          test_dir=test_dir, truth_dir=truth_dir, counts=counts)
