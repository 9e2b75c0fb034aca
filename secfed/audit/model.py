"""The audit report as data: frozen records, one JSON form (``report.json``), a schema version.

Everything the HTML page and the plots show comes from an :class:`AuditReport`; the JSON form is
validated against ``report.schema.json`` shipped next to this module.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from enum import Enum, StrEnum
from importlib import resources
from typing import Any

__all__ = [
    "SCHEMA_VERSION",
    "CheckStatus",
    "Check",
    "EntryRecord",
    "OutboundMessage",
    "OutboundLog",
    "BudgetOutlook",
    "EnterpriseReport",
    "RoundRecord",
    "FederationSettings",
    "Assumption",
    "AuditReport",
    "load_schema",
]

# Bump when a field changes meaning or is removed; adding an optional field keeps the version.
SCHEMA_VERSION = 1


class CheckStatus(StrEnum):
    """Outcome of one verification check."""

    PASS = "pass"
    FAIL = "fail"
    SKIPPED = "skipped"  # the input the check needs was not given (named in ``detail``)


@dataclass(frozen=True)
class Check:
    """One verification verdict; ``entry``/``round_number`` name what failed, when it is one thing."""

    name: str
    subject: str  # enterprise id, or "federation"
    status: CheckStatus
    detail: str
    entry: int | None = None
    round_number: int | None = None


@dataclass(frozen=True)
class EntryRecord:
    """One ledger entry as recorded, beside the ε the auditor recomputed from the events."""

    index: int
    round_number: int
    session_id: str  # hex
    mechanism: dict[str, Any]  # the event's canonical JSON, parsed
    recorded_epsilon_prv: float
    recorded_epsilon_rdp: float
    recomputed_epsilon_prv: float | None
    recomputed_epsilon_rdp: float | None
    entry_hash: str  # hex
    timestamp: str | None = None


@dataclass(frozen=True)
class OutboundMessage:
    """One message that left an enterprise's site, from the participant's own record."""

    round_number: int
    stage: str
    destination: str
    size_bytes: int
    protection: str  # masked | encrypted | signed | control
    sha256: str
    sent_at: str | None = None


@dataclass(frozen=True)
class OutboundLog:
    """Every outbound message of one enterprise and the count per protection."""

    source: str
    messages: tuple[OutboundMessage, ...]
    by_protection: dict[str, int]


@dataclass(frozen=True)
class BudgetOutlook:
    """What is left and how many more rounds like the last one the budget still allows."""

    remaining_epsilon: float | None  # None: the ledger's entries could not be read
    rounds_remaining: int | None  # None: no entry yet, so no "current σ" to project
    accountant: str
    noise_multiplier: float | None
    sample_rate: float | None
    steps_per_round: int | None


@dataclass(frozen=True)
class EnterpriseReport:
    """One enterprise's ledger, re-verified."""

    enterprise_id: str
    ledger_path: str
    identity_public_key: str | None  # hex, as pinned in federation.toml
    identity_pinned: bool
    budget_epsilon: float
    delta: float
    epsilon_prv: float | None  # recomputed by the auditor over every event; None: unreadable
    epsilon_rdp: float | None
    recorded_epsilon_prv: float  # what the newest entry claims
    recorded_epsilon_rdp: float
    rounds: tuple[int, ...]
    entries: tuple[EntryRecord, ...]
    outlook: BudgetOutlook
    head_hash: str | None  # hex of the newest entry's hash
    outbound: OutboundLog | None = None


@dataclass(frozen=True)
class RoundRecord:
    """One round as the coordinator's transcript records it."""

    round_number: int
    mode: str
    status: str
    threshold: int | None
    participants: tuple[str, ...]
    survivors: tuple[str, ...]
    global_hash_before: str | None = None
    global_hash_after: str | None = None


@dataclass(frozen=True)
class FederationSettings:
    """The federation's settings (from federation.toml) and its rounds (from the transcript)."""

    name: str | None
    source: str | None
    settings: dict[str, Any]
    roster: dict[str, str]  # enterprise id -> pinned Ed25519 public key (hex)
    rounds: tuple[RoundRecord, ...]


@dataclass(frozen=True)
class Assumption:
    """One assumption the privacy guarantee rests on, stated for the reader."""

    key: str
    text: str


@dataclass(frozen=True)
class AuditReport:
    """The whole audit: verdict, enterprises, federation, assumptions, checks, plot files."""

    generated_at: str
    secfed_version: str
    inputs: dict[str, Any]
    enterprises: tuple[EnterpriseReport, ...]
    federation: FederationSettings | None
    assumptions: tuple[Assumption, ...]
    checks: tuple[Check, ...]
    plots: dict[str, str] = field(default_factory=dict)
    # verified contribution shares and norm-check exclusions (issue 17); None without a
    # transcript or when the coordinator never kept probe outcomes
    contributions: dict[str, Any] | None = None

    @property
    def failures(self) -> tuple[Check, ...]:
        return tuple(c for c in self.checks if c.status is CheckStatus.FAIL)

    @property
    def verdict(self) -> str:
        return "fail" if self.failures else "pass"

    def to_json_dict(self) -> dict[str, Any]:
        """The ``report.json`` document (plain JSON types)."""
        body = _plain(asdict(self))
        return {"schema_version": SCHEMA_VERSION, "verdict": self.verdict, **body}

    def to_json(self) -> str:
        return json.dumps(self.to_json_dict(), indent=2, sort_keys=True, allow_nan=False)


def _plain(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # a tampered record can hold inf/NaN; JSON has no such numbers
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def load_schema() -> dict[str, Any]:
    """The JSON Schema of ``report.json`` (shipped as ``secfed/audit/report.schema.json``)."""
    text = resources.files("secfed.audit").joinpath("report.schema.json").read_text("utf-8")
    return json.loads(text)
