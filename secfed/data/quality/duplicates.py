"""Exact and near duplicates: the later copy of a record is flagged, the first kept."""

from __future__ import annotations

import hashlib
import re
from difflib import SequenceMatcher

import numpy as np

from secfed.data.loading import ImageTextDataset
from secfed.data.quality.embed import Embeddings
from secfed.data.quality.report import QualityReport
from secfed.data.quality.settings import QualitySettings

__all__ = ["find_duplicates"]

_NUMBER = re.compile(r"\d+")


def find_duplicates(dataset: ImageTextDataset, emb: Embeddings, report: QualityReport,
                    settings: QualitySettings) -> np.ndarray:
    """Add exact and near duplicates to ``report``; returns, per record, the index of the
    record it copies (-1 for none).

    Exact: identical image bytes and identical text. Near: 16x16 thumbnails almost identical
    (the generic ViT does not tell a re-encoded copy from a similar frame) and texts almost
    identical (MiniLM cosine, or character-level similarity for typo'd copies), or both absent;
    text-only records by MiniLM cosine or a stricter character-level similarity.
    """
    s = settings
    records = dataset.records
    n = len(records)
    # --- exact duplicates: same image bytes and same text
    first_seen: dict[bytes, int] = {}
    duplicate_of = np.full(n, -1)
    for i, r in enumerate(records):
        h = hashlib.sha256()
        if r.image is not None and "image" in dataset.modalities:
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
    near = both_image & (tp[:, None] == tp[None, :]) & (
        (same_text & (sim_thumb >= s.near_duplicate_image))
        | (~both_text & (sim_thumb >= s.near_duplicate_image_only)))
    near |= both_image & same_text & (sim_thumb >= s.near_duplicate_image_with_text)
    text_only = ~ip[:, None] & ~ip[None, :] & both_text
    near |= text_only & (sim_text >= s.near_duplicate_text_only)
    for i, j in zip(*np.nonzero(np.triu(text_only & ~near, 1))):
        matcher = SequenceMatcher(None, records[i].text or "", records[j].text or "")
        if (_NUMBER.findall(records[i].text or "") == _NUMBER.findall(records[j].text or "")
                and matcher.real_quick_ratio() >= s.near_duplicate_text_only_chars
                and matcher.ratio() >= s.near_duplicate_text_only_chars):
            near[i, j] = near[j, i] = True
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
    return duplicate_of
