"""The adapter as one flat float32 vector: layout, get/set, and the global adapter hash.

The layout covers every trainable parameter of a classifier (LoRA A/B matrices and the head),
sorted by parameter name, so two parties holding the same model directory agree on it byte for
byte. ``adapter_hash`` is "the global adapter hash" that round specs carry and that each
participant re-checks after applying an aggregate.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from secfed.errors import ModelError
from secfed.names import vector_hash

__all__ = [
    "LAYOUT_FORMAT",
    "AdapterLayout",
    "LayoutEntry",
    "adapter_hash",
    "adapter_layout",
    "get_flat",
    "set_flat",
]

# Version tag inside the canonical JSON: a layout's meaning never changes once released.
LAYOUT_FORMAT = "secfed-adapter-layout/v1"


@dataclass(frozen=True)
class LayoutEntry:
    """One trainable tensor inside the flat vector."""

    name: str
    shape: tuple[int, ...]
    offset: int
    numel: int


@dataclass(frozen=True)
class AdapterLayout:
    """Ordered ``(name, shape, offset, numel)`` entries over all trainable parameters.

    Build it with :func:`adapter_layout` or :meth:`from_json`; both check that names are sorted
    and unique, offsets contiguous from 0 and ``numel`` equal to the product of the shape.
    """

    entries: tuple[LayoutEntry, ...]

    def __post_init__(self) -> None:
        _check_entries(self.entries)

    @property
    def total(self) -> int:
        """Length of the flat vector."""
        if not self.entries:
            return 0
        last = self.entries[-1]
        return last.offset + last.numel

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(e.name for e in self.entries)

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, no spaces); the input of :meth:`digest`."""
        body = {
            "format": LAYOUT_FORMAT,
            "entries": [[e.name, list(e.shape), e.offset, e.numel] for e in self.entries],
        }
        return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> AdapterLayout:
        """Parse the canonical JSON form.

        Raises:
            ModelError: malformed JSON, unknown format tag or inconsistent entries.
        """
        try:
            body = json.loads(text)
        except (ValueError, TypeError) as exc:
            raise ModelError(f"adapter layout must be JSON ({exc.__class__.__name__})") from None
        if not isinstance(body, dict) or body.get("format") != LAYOUT_FORMAT:
            got = body.get("format") if isinstance(body, dict) else type(body).__name__
            raise ModelError(f"adapter layout format must be {LAYOUT_FORMAT!r} (got {got!r})")
        raw = body.get("entries")
        if not isinstance(raw, list):
            raise ModelError("adapter layout field 'entries' must be a list")
        entries = []
        for i, item in enumerate(raw):
            ok = (
                isinstance(item, list)
                and len(item) == 4
                and isinstance(item[0], str)
                and isinstance(item[1], list)
                and all(isinstance(d, int) and not isinstance(d, bool) for d in item[1])
                and all(isinstance(v, int) and not isinstance(v, bool) for v in item[2:])
            )
            if not ok:
                raise ModelError(
                    f"adapter layout entry {i} must be [name, [dims...], offset, numel] "
                    f"(got {item!r:.80})"
                )
            entries.append(LayoutEntry(item[0], tuple(item[1]), item[2], item[3]))
        return cls(tuple(entries))

    def digest(self) -> bytes:
        """SHA-256 of :meth:`to_json` (32 bytes)."""
        return hashlib.sha256(self.to_json().encode("ascii")).digest()


def _check_entries(entries: Iterable[LayoutEntry]) -> None:
    offset = 0
    previous: str | None = None
    for e in entries:
        if previous is not None and not e.name > previous:
            raise ModelError(
                f"adapter layout names must be sorted and unique ({e.name!r} after {previous!r})"
            )
        if any(d < 0 for d in e.shape):
            raise ModelError(f"adapter layout entry {e.name!r} has a negative dimension {e.shape}")
        if e.numel != math.prod(e.shape):
            raise ModelError(
                f"adapter layout entry {e.name!r}: numel must equal prod(shape)={math.prod(e.shape)}"
                f" (got {e.numel})"
            )
        if e.offset != offset:
            raise ModelError(
                f"adapter layout entry {e.name!r}: offset must be {offset} (got {e.offset})"
            )
        offset += e.numel
        previous = e.name


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def adapter_layout(model: nn.Module) -> AdapterLayout:
    """The layout of ``model``'s trainable parameters, sorted by name.

    Raises:
        ModelError: the model has no trainable parameter.
    """
    params = _trainable(model)
    if not params:
        raise ModelError("model has no trainable parameters: attach a LoRA adapter first")
    entries = []
    offset = 0
    for name in sorted(params):
        shape = tuple(int(d) for d in params[name].shape)
        numel = math.prod(shape)
        entries.append(LayoutEntry(name, shape, offset, numel))
        offset += numel
    return AdapterLayout(tuple(entries))


def _matching_params(model: nn.Module, layout: AdapterLayout) -> list[nn.Parameter]:
    params = _trainable(model)
    if sorted(params) != list(layout.names):
        missing = sorted(set(layout.names) - set(params))[:3]
        extra = sorted(set(params) - set(layout.names))[:3]
        raise ModelError(
            "model's trainable parameters must match the adapter layout "
            f"(missing {missing}, unexpected {extra})"
        )
    out = []
    for e in layout.entries:
        p = params[e.name]
        if tuple(p.shape) != e.shape:
            raise ModelError(
                f"parameter {e.name!r} must have shape {e.shape} (got {tuple(p.shape)})"
            )
        out.append(p)
    return out


def get_flat(model: nn.Module, layout: AdapterLayout) -> np.ndarray:
    """The trainable parameters as one float32 vector in layout order (a copy).

    Raises:
        ModelError: the model's trainable parameters do not match ``layout``.
    """
    params = _matching_params(model, layout)
    out = np.empty(layout.total, dtype=np.float32)
    with torch.no_grad():
        for e, p in zip(layout.entries, params):
            out[e.offset : e.offset + e.numel] = (
                p.detach().to(torch.float32).cpu().reshape(-1).numpy()
            )
    return out


def _check_vector(layout: AdapterLayout, vec: np.ndarray, what: str) -> None:
    if not isinstance(vec, np.ndarray) or vec.dtype != np.float32 or vec.ndim != 1:
        got = vec.dtype if isinstance(vec, np.ndarray) else type(vec).__name__
        raise ModelError(f"{what} must be a 1-D float32 numpy array (got {got})")
    if vec.shape[0] != layout.total:
        raise ModelError(f"{what} must have length {layout.total} (got {vec.shape[0]})")


def set_flat(model: nn.Module, layout: AdapterLayout, vec: np.ndarray) -> None:
    """Write ``vec`` (float32, layout order) into the model's trainable parameters.

    Raises:
        ModelError: wrong dtype/length, a non-finite value, or a layout mismatch.
    """
    _check_vector(layout, vec, "adapter vector")
    if not np.isfinite(vec).all():
        raise ModelError("adapter vector must be finite (got NaN or inf)")
    params = _matching_params(model, layout)
    with torch.no_grad():
        for e, p in zip(layout.entries, params):
            chunk = torch.from_numpy(vec[e.offset : e.offset + e.numel].copy())
            p.copy_(chunk.reshape(e.shape).to(dtype=p.dtype, device=p.device))


def adapter_hash(layout: AdapterLayout, vec: np.ndarray) -> str:
    """Hex SHA-256 over ``layout.digest()`` and the little-endian float32 bytes of ``vec``.

    Raises:
        ModelError: ``vec`` is not a float32 vector of length ``layout.total``.
    """
    _check_vector(layout, vec, "adapter vector")
    return vector_hash(layout.digest(), vec)
