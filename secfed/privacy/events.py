"""Immutable mechanism events and their versioned canonical JSON form.

An event says what was released, never how much privacy it cost: the accountant derives ε from
it. Once a version of an event is in a ledger its meaning never changes; a new meaning gets a
new ``v``. Decoding dispatches through a fixed table of known kinds (never by importing a name
found in the data).
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass
from typing import Any

from secfed.config import DPSGDTerms
from secfed.errors import ConfigError, MessageFormatError

__all__ = [
    "EVENT_VERSION",
    "DPSGDEvent",
    "GaussianEvent",
    "DistributedDPEvent",
    "MechanismEvent",
    "ChargeRelease",
    "LedgerEvent",
    "event_from_json",
    "canonical_json",
]

EVENT_VERSION = 1  # bump (and keep decoding the old one) if any field's meaning changes


def canonical_json(obj: dict[str, Any]) -> str:
    """Sorted keys, no whitespace, shortest round-tripping floats (Python ``repr``)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _positive_float(kind: str, name: str, value: object, *, upper: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{kind}.{name} must be a number (got {value!r})")
    value = float(value)
    if not math.isfinite(value) or value <= 0 or (upper is not None and value > upper):
        bound = f"(0, {upper}]" if upper is not None else "(0, inf)"
        raise ConfigError(f"{kind}.{name} must be in {bound} (got {value!r})")
    return value


def _positive_int(kind: str, name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ConfigError(f"{kind}.{name} must be an integer >= 1 (got {value!r})")
    return int(value)


@dataclass(frozen=True)
class DPSGDEvent:
    """``steps`` Poisson-subsampled Gaussian steps (Opacus DP-SGD): rate q, noise σ (× clip C)."""

    noise_multiplier: float
    sample_rate: float
    steps: int

    KIND = "dpsgd"

    @classmethod
    def of(cls, dp: DPSGDTerms) -> DPSGDEvent:
        """The release a round's DP-SGD terms make (what the ledger charges)."""
        return cls(noise_multiplier=dp.noise_multiplier, sample_rate=dp.sample_rate,
                   steps=dp.local_steps)

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "noise_multiplier", _positive_float("dpsgd", "noise_multiplier", self.noise_multiplier)
        )
        object.__setattr__(
            self, "sample_rate", _positive_float("dpsgd", "sample_rate", self.sample_rate, upper=1.0)
        )
        object.__setattr__(self, "steps", _positive_int("dpsgd", "steps", self.steps))

    def to_dict(self) -> dict[str, Any]:
        return {"v": EVENT_VERSION, "kind": self.KIND, "noise_multiplier": self.noise_multiplier,
                "sample_rate": self.sample_rate, "steps": self.steps}

    def to_json(self) -> str:
        return canonical_json(self.to_dict())


@dataclass(frozen=True)
class GaussianEvent:
    """``count`` releases of the Gaussian mechanism with noise σ × (L2 sensitivity), no sampling."""

    noise_multiplier: float
    count: int = 1

    KIND = "gaussian"

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "noise_multiplier", _positive_float("gaussian", "noise_multiplier", self.noise_multiplier)
        )
        object.__setattr__(self, "count", _positive_int("gaussian", "count", self.count))

    def to_dict(self) -> dict[str, Any]:
        return {"v": EVENT_VERSION, "kind": self.KIND, "noise_multiplier": self.noise_multiplier,
                "count": self.count}

    def to_json(self) -> str:
        return canonical_json(self.to_dict())


@dataclass(frozen=True)
class DistributedDPEvent:
    """``count`` releases of a sum carrying distributed Skellam noise (Agarwal et al. 2021).

    All quantities are in integer grid units of the noise: ``l2_sensitivity`` and
    ``l1_sensitivity`` bound one enterprise's rounded, clipped contribution; ``variance`` is the
    per-coordinate variance of the noise that actually reached the sum (shares × per-share
    variance); ``shares`` is how many noise shares that was (the survivors).
    """

    l2_sensitivity: float
    l1_sensitivity: float
    variance: float
    shares: int
    count: int = 1

    KIND = "skellam"

    def __post_init__(self) -> None:
        for name in ("l2_sensitivity", "l1_sensitivity", "variance"):
            object.__setattr__(self, name, _positive_float("skellam", name, getattr(self, name)))
        object.__setattr__(self, "shares", _positive_int("skellam", "shares", self.shares))
        object.__setattr__(self, "count", _positive_int("skellam", "count", self.count))

    @property
    def noise_multiplier(self) -> float:
        """Effective σ: noise standard deviation over the L2 sensitivity."""
        return math.sqrt(self.variance) / self.l2_sensitivity

    def to_dict(self) -> dict[str, Any]:
        return {"v": EVENT_VERSION, "kind": self.KIND, "l2_sensitivity": self.l2_sensitivity,
                "l1_sensitivity": self.l1_sensitivity, "variance": self.variance,
                "shares": self.shares, "count": self.count}

    def to_json(self) -> str:
        return canonical_json(self.to_dict())


MechanismEvent = DPSGDEvent | GaussianEvent | DistributedDPEvent


@dataclass(frozen=True)
class ChargeRelease:
    """Not a release of anything about the data: it withdraws the ledger's earlier charge entry
    ``entry`` (whose hash is ``entry_hash``, hex) for a round whose update never left the site
    (the round aborted before its upload). The ledger composes every charge it has not
    withdrawn; the audit re-verifies each withdrawal against the coordinator's transcript (no
    upload from the site in that round) and fails it otherwise. Added in issue 22 as a new kind
    (its own ``v`` 1): a reader that predates it refuses the entry instead of misreading it.
    """

    entry: int
    entry_hash: str

    KIND = "charge_release"

    def __post_init__(self) -> None:
        object.__setattr__(self, "entry", _positive_int("charge_release", "entry", self.entry))
        digest = self.entry_hash
        if not (isinstance(digest, str) and len(digest) == 64
                and all(c in "0123456789abcdef" for c in digest)):
            raise ConfigError(f"charge_release.entry_hash must be 64 lower-case hex characters "
                              f"(got {str(digest)[:70]!r})")

    def to_dict(self) -> dict[str, Any]:
        return {"v": EVENT_VERSION, "kind": self.KIND, "entry": self.entry,
                "entry_hash": self.entry_hash}

    def to_json(self) -> str:
        return canonical_json(self.to_dict())


#: What a ledger entry holds: a charge (a mechanism event) or the release of an earlier charge.
LedgerEvent = MechanismEvent | ChargeRelease

# The fixed table of kinds this version can decode: name -> (class, field names).
_KINDS: dict[str, tuple[type, tuple[str, ...]]] = {
    DPSGDEvent.KIND: (DPSGDEvent, ("noise_multiplier", "sample_rate", "steps")),
    GaussianEvent.KIND: (GaussianEvent, ("noise_multiplier", "count")),
    DistributedDPEvent.KIND: (
        DistributedDPEvent, ("l2_sensitivity", "l1_sensitivity", "variance", "shares", "count")
    ),
    ChargeRelease.KIND: (ChargeRelease, ("entry", "entry_hash")),
}


def event_from_json(text: str | bytes) -> LedgerEvent:
    """Decode an event's canonical JSON; the text must be exactly canonical.

    Raises:
        MessageFormatError: not JSON, unknown version or kind, missing/extra fields, or not in
            canonical form (so one event has exactly one encoding).
    """
    try:
        data = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MessageFormatError(f"mechanism event must be JSON (got {str(text)[:60]!r})") from exc
    if not isinstance(data, dict):
        raise MessageFormatError(f"mechanism event must be a JSON object (got {type(data).__name__})")
    if data.get("v") != EVENT_VERSION:
        raise MessageFormatError(f"mechanism event v must be {EVENT_VERSION} (got {data.get('v')!r})")
    kind = data.get("kind")
    if kind not in _KINDS:
        raise MessageFormatError(f"mechanism event kind must be one of {sorted(_KINDS)} (got {kind!r})")
    cls, fields = _KINDS[kind]
    if set(data) != {"v", "kind", *fields}:
        raise MessageFormatError(
            f"{kind} event fields must be {sorted(fields)} (got {sorted(set(data) - {'v', 'kind'})})"
        )
    try:
        event = cls(**{name: data[name] for name in fields})
    except ConfigError as exc:
        raise MessageFormatError(f"{kind} event is invalid: {exc}") from exc
    raw = text.decode() if isinstance(text, bytes) else text
    if event.to_json() != raw:
        raise MessageFormatError(f"{kind} event is not in canonical JSON form")
    return event
