"""The coordinator's HTTP API contract: control models (JSON), the binary upload envelope, the
service interface the server calls, and the mapping of typed errors to HTTP statuses.

Routes (all under mutual TLS; the caller's identity is its verified client certificate)::

    GET  /v1/health                                    liveness
    GET  /v1/round?after=R&wait=S                      RoundInfo of the newest round > R (long poll)
    GET  /v1/rounds/{r}/inbox/{stage}?wait=S           this caller's protocol input for a stage
    POST /v1/rounds/{r}/stages/{stage}                 Envelope(ledger head, protocol message)
    POST /v1/rounds/{r}/stages/{stage}/exchange?next=N&wait=S
                                                       the same Envelope, answered with this
                                                       caller's input for stage N (long poll;
                                                       202 + SubmitAck if N is not open in time)
    POST /v1/rounds/{r}/applied                        AppliedConfirmation (signed new global hash)
    POST /v1/rounds/{r}/refusal                        RoundRefusal (signed: the site declines
                                                       round r under its own policy, and why)
    POST /v1/ready                                     SiteReady (model loaded, features
                                                       computed: round 1 may open)
    GET  /v1/rounds/{r}/outcome                        RoundOutcome (survivors, agreed hash)
    GET  /v1/rounds/{r}/aggregate                      a done round's final message (catch-up)
"""

from __future__ import annotations

import hashlib
import struct
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from secfed import errors as E
from secfed import names
from secfed.config import RoundTerms
from secfed.errors import MessageFormatError

__all__ = [
    "API_VERSION",
    "STAGES",
    "ENVELOPE_MAGIC",
    "Envelope",
    "RoundInfo",
    "SubmitAck",
    "AppliedConfirmation",
    "RoundOutcome",
    "ErrorBody",
    "FederationService",
    "STATUS_OF",
    "status_for",
    "error_from_body",
    "applied_signed_bytes",
    "RoundRefusal",
    "REFUSAL_REASONS",
    "MAX_REFUSAL_DETAIL",
    "MAX_CONTRIBUTION_HEX",
    "refusal_signed_bytes",
    "SiteReady",
]

API_VERSION = 1
# Protocol stages a participant posts to, in order, plus the transport's own "applied" step.
# New stages are appended so existing envelope stage codes keep their meaning; "reveal" (the
# secagg+ graph coins) comes between advertise and share in a round.
STAGES: tuple[str, ...] = tuple(s.value for s in names.WIRE_STAGES)  # index = wire code
ENVELOPE_MAGIC = b"SFE1"  # secfed envelope, format 1
_HEADER = struct.Struct(">4sBQBI")  # magic, version, round, stage code, ledger-head length
MAX_LEDGER_HEAD = 4096  # a LedgerHead is ~150 bytes; bound the allocation on bad input
_APPLIED_LABEL = names.LABEL_APPLIED
_REFUSAL_LABEL = names.LABEL_REFUSAL
#: Why a site refuses a round (a small fixed set: the coordinator counts refusals by it).
#: ``budget``: the round would take the site past its privacy budget; ``policy``: the terms are
#: weaker than the site's own floors (site.toml); ``pinned``: the announced round differs from
#: the site's pinned federation.toml; ``global_hash``: the round starts from another adapter;
#: ``config``: the site cannot take part as configured (e.g. a missing CKKS key).
REFUSAL_REASONS: tuple[str, ...] = ("budget", "policy", "pinned", "global_hash", "config")
MAX_REFUSAL_DETAIL = 1000  # characters of the site's own error line (names a rule, no secret)
# hex characters of a ContributionReport carried on a confirmation: ~30 bytes per surviving peer,
# so this holds over 8000 peers while bounding what one request can make the coordinator parse
MAX_CONTRIBUTION_HEX = 1 << 19


class Envelope:
    """A participant's stage message: ``magic | version u8 | round u64 | stage u8 |
    head_len u32 | ledger head | protocol message`` (big-endian header)."""

    __slots__ = ("round_number", "stage", "ledger_head", "payload")

    def __init__(self, *, round_number: int, stage: str, ledger_head: bytes, payload: bytes):
        if stage not in STAGES:
            raise MessageFormatError(f"envelope stage must be one of {STAGES} (got {stage!r})")
        self.round_number = round_number
        self.stage = stage
        self.ledger_head = bytes(ledger_head)
        self.payload = bytes(payload)

    def to_bytes(self) -> bytes:
        if len(self.ledger_head) > MAX_LEDGER_HEAD:
            raise MessageFormatError(
                f"ledger head must be <= {MAX_LEDGER_HEAD} bytes (got {len(self.ledger_head)})"
            )
        head = _HEADER.pack(
            ENVELOPE_MAGIC, API_VERSION, self.round_number, STAGES.index(self.stage),
            len(self.ledger_head),
        )
        return head + self.ledger_head + self.payload

    @classmethod
    def from_bytes(cls, data: bytes) -> Envelope:
        """Raises: MessageFormatError for any malformed envelope."""
        if len(data) < _HEADER.size:
            raise MessageFormatError(
                f"envelope must be >= {_HEADER.size} bytes (got {len(data)})"
            )
        magic, version, round_number, code, head_len = _HEADER.unpack_from(data)
        if magic != ENVELOPE_MAGIC:
            raise MessageFormatError(f"envelope magic must be {ENVELOPE_MAGIC!r} (got {magic!r})")
        if version != API_VERSION:
            raise MessageFormatError(f"envelope version must be {API_VERSION} (got {version})")
        if code >= len(STAGES):
            raise MessageFormatError(f"envelope stage code must be < {len(STAGES)} (got {code})")
        if head_len > MAX_LEDGER_HEAD or _HEADER.size + head_len > len(data):
            raise MessageFormatError(
                f"envelope ledger head length must fit the body (got {head_len})"
            )
        start = _HEADER.size
        return cls(
            round_number=round_number,
            stage=STAGES[code],
            ledger_head=data[start : start + head_len],
            payload=data[start + head_len :],
        )

    def payload_sha256(self) -> str:
        return hashlib.sha256(self.payload).hexdigest()


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class RoundInfo(_Model):
    """What the coordinator announces about a round."""

    round_number: int = Field(ge=0, description="0 = no round opened yet")
    status: Literal["waiting", "open", "done", "aborted", "finished"]
    stage: str | None = None
    spec_hex: str | None = Field(None, description="RoundSpec.to_bytes(), hex")
    terms: RoundTerms | None = None
    stage_deadline_unix: float | None = None
    abort_reason: str | None = None


class SubmitAck(_Model):
    accepted: bool
    duplicate: bool = False
    round_number: int
    stage: str
    sha256: str


class AppliedConfirmation(_Model):
    """A survivor's signed statement: after round r the global adapter hash is ``global_hash``.

    In a probed round it also carries the site's contribution report (``contribution_hex``),
    which the coordinator takes exactly as a contribute-stage message; the signature covers the
    hash only, and the report, like every stage message, is bound to its sender by mutual TLS.
    """

    global_hash: str = Field(pattern=r"^[0-9a-f]{64}$")
    signature_hex: str = Field(pattern=r"^[0-9a-f]{128}$")
    ledger_head_hex: str = Field(
        "", pattern=r"^([0-9a-f]{2}){0,2048}$",
        description="the site's signed ledger head after the round (the coordinator receipts it)",
    )
    contribution_hex: str = Field(
        "", max_length=MAX_CONTRIBUTION_HEX, pattern=r"^([0-9a-f]{2})*$",
        description="a probed round's contribution report (the contribute stage's message, "
                    "the same bytes): carried here instead of a round trip of its own",
    )


class RoundRefusal(_Model):
    """A site's signed statement: it declines round ``r`` under its own policy, and why.

    The signature (the site's pinned Ed25519 identity) covers :func:`refusal_signed_bytes` --
    federation, round, the announced spec's SHA-256, reason and detail -- so the coordinator
    records only refusals the site really made, for the round it really announced.
    """

    reason: Literal["budget", "policy", "pinned", "global_hash", "config"]
    detail: str = Field("", max_length=MAX_REFUSAL_DETAIL)
    spec_sha256: str = Field(pattern=r"^[0-9a-f]{64}$",
                             description="SHA-256 of the RoundSpec bytes the site refused")
    signature_hex: str = Field(pattern=r"^[0-9a-f]{128}$")


class SiteReady(_Model):
    """A site has loaded its model and data (tower features computed) and can train now."""

    ready: Literal[True] = True


class RoundOutcome(_Model):
    round_number: int
    status: Literal["open", "done", "aborted"]
    mode: str
    survivors: tuple[str, ...] = ()
    global_hash_before: str = ""
    global_hash_after: str | None = None
    confirmations: dict[str, AppliedConfirmation] = {}
    abort_reason: str | None = None
    receipts: dict[str, list[str]] = Field(
        {}, description="sender -> the coordinator's signed ledger-head receipts (hex)")


class ErrorBody(_Model):
    error: str = Field(description="secfed error class name, e.g. MessageFormatError")
    message: str


def applied_signed_bytes(*, federation: str, round_number: int, global_hash: str) -> bytes:
    """Domain-separated bytes an enterprise signs to confirm the new global adapter hash."""
    fed = federation.encode("utf-8")
    return (
        _APPLIED_LABEL + struct.pack(">H", len(fed)) + fed + struct.pack(">Q", round_number)
        + bytes.fromhex(global_hash)
    )


def refusal_signed_bytes(*, federation: str, round_number: int, spec_sha256: str, reason: str,
                         detail: str) -> bytes:
    """Domain-separated bytes an enterprise signs to refuse a round (length-prefixed fields)."""
    fed, why, text = (x.encode("utf-8") for x in (federation, reason, detail))
    return (
        _REFUSAL_LABEL + struct.pack(">H", len(fed)) + fed + struct.pack(">Q", round_number)
        + bytes.fromhex(spec_sha256) + struct.pack(">H", len(why)) + why
        + struct.pack(">I", len(text)) + text
    )


class FederationService(Protocol):
    """What the HTTP layer calls; implemented by :mod:`secfed.coordinator`. Raise typed errors."""

    async def round_info(self, *, after: int, wait: float, sender: str | None = None
                         ) -> RoundInfo: ...

    async def inbox(
        self, *, sender: str, round_number: int, stage: str, wait: float
    ) -> bytes | None: ...

    async def submit(self, *, sender: str, envelope: Envelope) -> SubmitAck: ...

    async def confirm(
        self, *, sender: str, round_number: int, confirmation: AppliedConfirmation
    ) -> SubmitAck: ...

    async def outcome(self, *, round_number: int) -> RoundOutcome: ...

    async def refuse(
        self, *, sender: str, round_number: int, refusal: RoundRefusal
    ) -> SubmitAck: ...

    async def ready(self, *, sender: str) -> RoundInfo: ...

    async def aggregate(self, *, sender: str, round_number: int) -> bytes: ...


# Typed errors -> HTTP status. The most specific class wins (checked in this order).
STATUS_OF: tuple[tuple[type[E.SecfedError], int], ...] = (
    (E.MessageFormatError, 400),
    (E.InvalidSignature, 400),
    (E.DecryptionError, 400),
    (E.ConfigError, 400),
    (E.ProtocolAbort, 410),
    (E.ProtocolError, 409),
    (E.TransportError, 403),
    (E.SecfedError, 422),
)


def status_for(exc: E.SecfedError) -> int:
    for cls, status in STATUS_OF:
        if isinstance(exc, cls):
            return status
    return 422


def error_from_body(status: int, body: ErrorBody) -> E.SecfedError:
    """Rebuild the typed error a server reported (only classes of the secfed family)."""
    cls = getattr(E, body.error, None) if body.error in E.__all__ else None
    if cls is None or not (isinstance(cls, type) and issubclass(cls, E.SecfedError)):
        return E.TransportError(f"coordinator answered {status}: {body.message}")
    if cls in (E.InvalidSignature, E.DecryptionError):
        return cls()
    try:
        return cls(f"coordinator answered {status}: {body.message}")
    except TypeError:
        return E.TransportError(f"coordinator answered {status}: {body.message}")
