"""Score ``secfed data check`` against the generator's defect truth (``truth/<enterprise>.json``).

Only a generated federation has a truth file: a real site's data does not say which of its
labels are wrong. This is how the checks' precision and recall are measured on city safety.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from secfed.data.quality import QualityReport, check_dataset
from secfed.errors import DataError
from secfed.models.storage import load_classifier

__all__ = ["read_truth", "score_against_truth", "score_federation"]


def read_truth(path: Path | str) -> dict:
    """A generator's defect truth file (``truth/<enterprise>.json``), checked for the keys
    :func:`score_against_truth` reads.

    Raises:
        DataError: unreadable, not JSON, or a list/entry missing.
    """
    try:
        truth = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"truth must be a readable JSON file (got {str(path)!r}: "
                        f"{type(exc).__name__})") from None
    if not isinstance(truth, dict):
        raise DataError(f"truth must be a JSON object (got {type(truth).__name__} "
                        f"in {str(path)!r})")
    for key, fields in (("mislabels", ("id",)), ("mismatches", ("id",)),
                        ("duplicates", ("id", "duplicate_of"))):
        entries = truth.get(key)
        if not isinstance(entries, list) or not all(
                isinstance(e, dict) and all(isinstance(e.get(f), str) for f in fields)
                for e in entries):
            raise DataError(f"truth.{key} must be a list of objects with string "
                            f"{'/'.join(fields)} (got {entries!r:.80} in {str(path)!r})")
    return truth


def score_against_truth(report: QualityReport, truth: dict) -> dict[str, dict[str, float]]:
    """Precision and recall of each check against a generator's defect truth file."""

    def pr(found: set, expected: set) -> dict[str, float]:
        hit = len(found & expected)
        return {"precision": hit / len(found) if found else 1.0,
                "recall": hit / len(expected) if expected else 1.0,
                "hits": hit, "found": len(found), "expected": len(expected)}

    dup_found = {frozenset((d["id"], d["duplicate_of"]))
                 for d in report.exact_duplicates + report.near_duplicates}
    dup_truth = {frozenset((d["id"], d["duplicate_of"])) for d in truth["duplicates"]}
    return {
        "duplicates": pr(dup_found, dup_truth),
        "mislabels": pr({m["id"] for m in report.mislabels}, {m["id"] for m in truth["mislabels"]}),
        "mismatches": pr({m["id"] for m in report.mismatches},
                         {m["id"] for m in truth["mismatches"]}),
    }


def score_federation(federation_dir: Path | str, *, model_dir: Path | str,
                     model=None, log=None) -> dict:
    """Run the check on every enterprise of a generated federation and score it.

    Reads ``federation.json`` and ``truth/<enterprise>.json`` (as written by
    ``generate_federation``). Returns ``{"enterprises": {name: {kind: {precision, recall,
    found, expected}, "records": n, "seconds": s}}, "pooled": {kind: {...}}}``, pooled over the
    enterprises (hits and counts summed).

    Raises:
        DataError: not a generated federation, or a dataset / truth file is malformed.
    """
    root = Path(federation_dir)
    try:
        names = json.loads((root / "federation.json").read_text())["enterprises"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"federation must hold a readable federation.json with 'enterprises' "
                        f"(got {str(root)!r}: {type(exc).__name__})") from None
    if model is None:
        model, _ = load_classifier(model_dir)
    out: dict = {"enterprises": {}, "pooled": {}}
    hits: dict[str, list[int]] = {}
    for name in names:
        start = time.perf_counter()
        report, _ = check_dataset(root / name, model_dir=model_dir, model=model)
        scores = score_against_truth(report, read_truth(root / "truth" / f"{name}.json"))
        out["enterprises"][name] = scores | {"records": report.records,
                                             "seconds": round(time.perf_counter() - start, 2)}
        for kind, v in scores.items():
            h = hits.setdefault(kind, [0, 0, 0])
            h[0] += v["hits"]
            h[1] += v["found"]
            h[2] += v["expected"]
        if log is not None:
            log(f"{name}: " + ", ".join(f"{k} {v['precision']:.2f}/{v['recall']:.2f}"
                                        for k, v in scores.items()))
    out["pooled"] = {kind: {"precision": h[0] / h[1] if h[1] else 1.0,
                            "recall": h[0] / h[2] if h[2] else 1.0,
                            "hits": h[0], "found": h[1], "expected": h[2]}
                     for kind, h in hits.items()}
    return out
