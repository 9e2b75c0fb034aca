"""Label-free image features for the checks: colour/texture statistics and a thumbnail."""

from __future__ import annotations

import numpy as np
from PIL import Image

__all__ = ["image_statistics", "thumbnail_of"]


def image_statistics(frame: np.ndarray) -> np.ndarray:
    """Colour and texture statistics of one RGB frame (uint8 ``[H, W, 3]``).

    On a 4x4 grid: chromaticity mean/std, brightness-normalised luminance mean/std, gradient
    magnitude mean/std and a 6-bin orientation histogram; per horizontal third: the share of
    orange, yellow, blue, grey, red and saturated pixels, a saturation-weighted 12-bin hue
    histogram, horizontal/vertical edge energy, colour diversity and a uniform local-binary-
    pattern histogram; a global chromaticity x brightness histogram. Mostly invariant to the
    camera gain, cheap, and independent of any label.
    """
    x = frame.astype(np.float32) / 255.0
    h, w, _ = x.shape
    lum = x.mean(2)
    chroma = x / (x.sum(2, keepdims=True) + 1e-3)
    gy, gx = np.gradient(lum)
    mag = np.hypot(gx, gy)
    orientation = np.minimum((np.mod(np.arctan2(gy, gx), np.pi) / np.pi * 6).astype(int), 5)
    lum_z = (lum - lum.mean()) / (lum.std() + 1e-3)
    feats: list[np.ndarray] = []
    for rows in np.array_split(np.arange(h), 4):
        for cols in np.array_split(np.arange(w), 4):
            cell = np.ix_(rows, cols)
            c = chroma[cell].reshape(-1, 3)
            m = mag[cell].ravel()
            hist = np.bincount(orientation[cell].ravel(), weights=m, minlength=6)
            feats += [c.mean(0), c.std(0),
                      np.array([lum_z[cell].mean(), lum_z[cell].std(), m.mean(), m.std()]),
                      hist / (m.sum() + 1e-6)]
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    top = x.max(2)
    saturation = (top - x.min(2)) / (top + 1e-3)
    colour_masks = (
        (r > g * 1.3) & (g > b * 1.2) & (saturation > 0.4),  # orange
        (r > 0.6) & (g > 0.6) & (b < 0.5 * g),  # yellow
        (b > r * 1.15) & (b > g * 0.95) & (saturation > 0.2),  # blue
        saturation < 0.12,  # grey
        (r > 1.5 * g) & (r > 1.5 * b),  # red
        saturation > 0.45,  # any vivid colour
    )
    hue = np.arctan2(np.sqrt(3.0) * (g - b), 2 * r - g - b)
    hue_bin = ((hue + np.pi) / (2 * np.pi) * 12).astype(int) % 12
    colour_code = (np.minimum((x * 4).astype(int), 3) * np.array([16, 4, 1])).sum(2)
    lbp = _uniform_lbp(lum)
    for rows in np.array_split(np.arange(h), 3):
        feats.append(np.array([m[rows].mean() for m in colour_masks]))
        hue_hist = np.bincount(hue_bin[rows].ravel(), weights=saturation[rows].ravel(),
                               minlength=12)
        feats.append(hue_hist / (hue_hist.sum() + 1e-3))
        counts = np.bincount(colour_code[rows].ravel(), minlength=64)
        feats.append(np.array([np.abs(gx[rows]).mean(), np.abs(gy[rows]).mean(),
                               (counts > 0).mean(), (counts >= 3).mean()]))
        inner = rows[(rows >= 1) & (rows < h - 1)] - 1
        feats.append(np.bincount(lbp[inner].ravel(), minlength=10) / max(lbp[inner].size, 1))
    levels = np.minimum((np.stack([chroma[..., 0], chroma[..., 1], lum], -1) * 3).astype(int), 2)
    bins = (levels[..., 0] * 3 + levels[..., 1]) * 3 + levels[..., 2]
    feats.append(np.bincount(bins.ravel(), minlength=27) / bins.size)
    return np.concatenate(feats).astype(np.float32)


def _uniform_lbp(lum: np.ndarray) -> np.ndarray:
    """Uniform 8-neighbour local binary patterns of the interior pixels (codes 0-9)."""
    centre = lum[1:-1, 1:-1]
    ring = (lum[:-2, :-2], lum[:-2, 1:-1], lum[:-2, 2:], lum[1:-1, 2:], lum[2:, 2:],
            lum[2:, 1:-1], lum[2:, :-2], lum[1:-1, :-2])
    bits = np.stack([n >= centre + 0.02 for n in ring])  # 0.02: ignore sensor noise
    transitions = (bits != np.roll(bits, 1, axis=0)).sum(0)
    return np.where(transitions <= 2, bits.sum(0), 9)


def thumbnail_of(frame: np.ndarray) -> np.ndarray:
    """A 16x16 box-filtered copy, brightness-centred: a perceptual embedding for copies."""
    small = np.asarray(Image.fromarray(frame).resize((16, 16), Image.Resampling.BOX), np.float32)
    return (small - small.mean()).ravel()
