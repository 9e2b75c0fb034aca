"""Independent re-verification of privacy ledgers, transcripts and outbound logs.

Nothing recorded is taken on trust. Each ledger goes through the privacy package's one
verification path (:func:`secfed.privacy.verify_ledger`: contiguous indices, hash chain, each
Ed25519 signature under the identity *pinned in the federation file*, δ and budget, ε); on top of
that this module recomputes every entry's ε (PRV and RDP) from the recorded mechanism events with
the accountant and reports each mismatch, checks the spend against the budget, projects the
rounds the budget still allows, matches every signed ledger head the coordinator stored against
the ledger, and checks how every outbound message was protected.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from secfed import names
from secfed.audit.model import (
    BudgetOutlook,
    Check,
    CheckStatus,
    EnterpriseReport,
    EntryRecord,
    OutboundLog,
)
from secfed.audit.sources import Transcript, TranscriptSeal
from secfed.crypto.keys import constant_time_equal, verify_signature
from secfed.errors import (
    AuditError,
    InvalidSignature,
    LedgerError,
    LedgerVerificationError,
    MessageFormatError,
    SecfedError,
)
from secfed.privacy import (
    DistributedDPEvent,
    DPSGDEvent,
    GaussianEvent,
    LedgerEntry,
    LedgerHead,
    LedgerReport,
    MechanismEvent,
    compose_epsilon,
    read_ledger,
    read_ledger_meta,
    verify_ledger,
)
from secfed.privacy.events import ChargeRelease
from secfed.privacy.ledger import effective_events, read_receipts, verify_receipts
from secfed.privacy.receipts import (
    GENESIS_LINK,
    LedgerReceipt,
    transcript_link,
    transcript_link_message,
)

__all__ = [
    "EPSILON_RTOL",
    "UPDATE_STAGES",
    "UPDATE_PROTECTIONS",
    "PROTECTIONS",
    "LedgerAudit",
    "read_enterprise_id",
    "audit_ledger",
    "rounds_remaining",
    "check_transcript",
    "check_transcript_signed",
    "check_receipts",
    "check_ledgers_supplied",
    "check_outbound",
    "check_releases",
]

# A recorded ε must equal the recomputed one to this relative tolerance (plus 1e-9 absolute):
# both come from the same deterministic accountant over the same events, so any larger gap means
# the record and the events disagree.
EPSILON_RTOL = 1e-6
# Stages whose message carries the model update (secfed.protocol.Stage.UPLOAD).
UPDATE_STAGES = frozenset({names.Stage.UPLOAD.value})
# How an update may leave a site: masked (secagg/secagg+) or CKKS-encrypted. Never in clear.
UPDATE_PROTECTIONS = frozenset(names.UPDATE_PROTECTIONS)
PROTECTIONS = frozenset(names.PROTECTIONS)
# Cap on the "rounds still allowed" projection (a budget that never runs out at this σ).
MAX_PROJECTED_ROUNDS = 1_000_000
# Accountant of the online budget check when the ledger's own setting cannot be read (a ledger
# that failed verification): RDP, the ledger's default and the larger (more cautious) ε.
FALLBACK_BUDGET_ACCOUNTANT = "rdp"


@dataclass(frozen=True)
class LedgerAudit:
    """One ledger's report and checks, plus what the transcript cross-check needs."""

    report: EnterpriseReport
    checks: tuple[Check, ...]
    entries: tuple[LedgerEntry, ...]
    verify_key: bytes | None  # pinned key, else the ledger's own recorded key (when readable)


def _fail(name: str, subject: str, detail: str, **where: Any) -> Check:
    return Check(name, subject, CheckStatus.FAIL, detail, **where)


def _pass(name: str, subject: str, detail: str) -> Check:
    return Check(name, subject, CheckStatus.PASS, detail)


def _skip(name: str, subject: str, detail: str) -> Check:
    return Check(name, subject, CheckStatus.SKIPPED, detail)


def _close(recorded: float, recomputed: float) -> bool:
    return math.isclose(recorded, recomputed, rel_tol=EPSILON_RTOL, abs_tol=1e-9)


def read_enterprise_id(path: Path) -> str:
    """The enterprise a ledger file belongs to (its header, unverified).

    Raises:
        AuditError: the file is not a readable secfed ledger.
    """
    return _header(path)["enterprise_id"]


def _header(path: Path) -> dict[str, str]:
    try:
        meta = read_ledger_meta(path)
    except LedgerError as exc:
        raise AuditError(f"--ledger {str(path)!r} is not a readable secfed ledger: {exc}") from exc
    if not meta.get("enterprise_id"):
        raise AuditError(f"--ledger {str(path)!r}: header names no enterprise_id")
    return meta


def _scaled(event: MechanismEvent, k: int) -> MechanismEvent:
    """``k`` repetitions of ``event`` as one event (steps/count multiply; the accountants agree)."""
    if isinstance(event, DPSGDEvent):
        return dataclasses.replace(event, steps=event.steps * k)
    if isinstance(event, GaussianEvent | DistributedDPEvent):
        return dataclasses.replace(event, count=event.count * k)
    raise AuditError(
        f"mechanism event kind must be known to the audit (got {type(event).__name__})"
    )


def rounds_remaining(
    events: Sequence[MechanismEvent], *, budget: float, delta: float, accountant: str
) -> int | None:
    """How many more rounds like the newest one keep ε (``accountant``) within ``budget``.

    ``None`` for an empty ledger (no current σ). Capped at :data:`MAX_PROJECTED_ROUNDS`.
    """
    if not events:
        return None
    last = events[-1]

    def fits(k: int) -> bool:
        eps = compose_epsilon((*events, _scaled(last, k)), delta=delta, accountant=accountant)
        return eps <= budget

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= MAX_PROJECTED_ROUNDS and fits(hi):
        lo, hi = hi, hi * 2
    if hi > MAX_PROJECTED_ROUNDS:
        return MAX_PROJECTED_ROUNDS
    while hi - lo > 1:  # fits(lo) and not fits(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def _mechanism(entry: LedgerEntry) -> dict[str, Any]:
    return dict(entry.event.to_dict())


def _identity_check(eid: str, pinned_key: bytes | None, federation_given: bool) -> Check:
    """Whether the ledger's signer is pinned by the federation file."""
    if pinned_key is not None:
        return _pass("identity_pinned", eid, "Ed25519 key pinned in the federation file")
    if federation_given:
        return _fail(
            "identity_pinned", eid, f"enterprise {eid!r} is not on the federation file's roster"
        )
    return _skip(
        "identity_pinned",
        eid,
        "no federation file (--federation): signatures checked only against "
        "the key the ledger records for itself",
    )


def _integrity_check(path: Path, eid: str, pinned_key: bytes | None) -> tuple[Check, LedgerReport | None]:
    """The privacy package's one verification path (chain, indices, signatures, budget, δ)."""
    try:
        verified = verify_ledger(path, public_key=pinned_key)
    except LedgerVerificationError as exc:
        return _fail("ledger_integrity", eid, str(exc), entry=exc.entry), None
    except LedgerError as exc:
        return _fail("ledger_integrity", eid, str(exc)), None
    return (
        _pass(
            "ledger_integrity",
            eid,
            f"{len(verified.entries)} entries: indices contiguous, hash chain intact, every "
            "signature verifies under the "
            + ("pinned identity" if pinned_key is not None else "ledger's own recorded key"),
        ),
        verified,
    )


def _read_entries(path: Path, eid: str) -> tuple[tuple[LedgerEntry, ...], Check | None]:
    """The ledger's entries, or none and the failing ``ledger_readable`` check."""
    try:
        return tuple(read_ledger(path)), None
    except LedgerVerificationError as exc:
        return (), _fail("ledger_readable", eid, str(exc), entry=exc.entry)
    except LedgerError as exc:
        return (), _fail("ledger_readable", eid, str(exc))


@dataclass(frozen=True)
class _Settings:
    """The budget the ledger is held to (verified, else its header's)."""

    budget: float
    delta: float
    accountant: str
    verify_key: bytes | None


def _settings(path: Path, header: Mapping[str, str], verified: LedgerReport | None,
              pinned_key: bytes | None, checks: Sequence[Check]) -> _Settings:
    """Budget, δ, accountant and key: the verified ledger's, else (already FAIL) its header's.

    Raises:
        AuditError: an unverified ledger whose header's budget or δ cannot be read.
    """
    if verified is not None:
        return _Settings(verified.budget, verified.delta, verified.budget_accountant,
                         verified.public_key)
    try:
        budget, delta = float(header["budget_epsilon"]), float(header["delta"])
    except (KeyError, ValueError) as exc:
        raise AuditError(
            f"--ledger {str(path)!r}: header budget/delta unreadable ({exc}); "
            + "; ".join(c.detail for c in checks if c.status is CheckStatus.FAIL)
        ) from exc
    accountant = header.get("budget_accountant", FALLBACK_BUDGET_ACCOUNTANT)
    if accountant not in ("prv", "rdp"):
        accountant = FALLBACK_BUDGET_ACCOUNTANT
    return _Settings(budget, delta, accountant, pinned_key)


def _timestamp(entry: LedgerEntry) -> str | None:
    if math.isfinite(entry.timestamp) and 0 <= entry.timestamp < 1e11:
        return datetime.fromtimestamp(entry.timestamp, tz=UTC).isoformat(timespec="milliseconds")
    return None


@dataclass
class _Recomputed:
    """ε recomputed entry by entry from the recorded events, and the mismatches found."""

    records: list[EntryRecord]
    events: list[MechanismEvent]
    eps_prv: float
    eps_rdp: float
    failures: list[Check]


def _recompute(eid: str, entries: Sequence[LedgerEntry], delta: float,
               unreadable: bool) -> _Recomputed:
    """Each entry's ε (PRV and RDP) recomputed from the events so far; a mismatch fails."""
    out = _Recomputed([], [], float("nan") if unreadable else 0.0,
                      float("nan") if unreadable else 0.0, [])
    for position, entry in enumerate(entries, start=1):
        if isinstance(entry.event, ChargeRelease):  # composes the charges not withdrawn
            out.events = list(effective_events(entries[:position]))
        else:
            out.events.append(entry.event)
        try:
            out.eps_prv = compose_epsilon(out.events, delta=delta, accountant="prv")
            out.eps_rdp = compose_epsilon(out.events, delta=delta, accountant="rdp")
        except SecfedError as exc:
            out.failures.append(
                _fail(
                    "epsilon_recomputed",
                    eid,
                    f"entry {entry.index}: accountant refused the events: {exc}",
                    entry=entry.index,
                    round_number=entry.round_number,
                )
            )
            out.eps_prv = out.eps_rdp = float("nan")
        else:
            for name, recorded, recomputed in (
                ("PRV", entry.eps_prv, out.eps_prv),
                ("RDP", entry.eps_rdp, out.eps_rdp),
            ):
                if not _close(recorded, recomputed):
                    out.failures.append(
                        _fail(
                            "epsilon_recomputed",
                            eid,
                            f"entry {entry.index} (round {entry.round_number}): recorded ε {name} "
                            f"{recorded!r} but the recorded events give {recomputed!r}",
                            entry=entry.index,
                            round_number=entry.round_number,
                        )
                    )
        out.records.append(
            EntryRecord(
                index=entry.index,
                round_number=entry.round_number,
                session_id=entry.session_id.hex(),
                mechanism=_mechanism(entry),
                recorded_epsilon_prv=entry.eps_prv,
                recorded_epsilon_rdp=entry.eps_rdp,
                recomputed_epsilon_prv=out.eps_prv if math.isfinite(out.eps_prv) else None,
                recomputed_epsilon_rdp=out.eps_rdp if math.isfinite(out.eps_rdp) else None,
                entry_hash=entry.entry_hash.hex(),
                timestamp=_timestamp(entry),
            )
        )
    return out


def _recompute_checks(eid: str, rec: _Recomputed, n_entries: int, unreadable: bool) -> list[Check]:
    """The ``epsilon_recomputed`` verdict: each mismatch, else one pass (or skip)."""
    if unreadable:
        return [*rec.failures, _skip("epsilon_recomputed", eid, "the ledger's entries cannot be read")]
    if rec.failures:
        return list(rec.failures)
    return [
        _pass(
            "epsilon_recomputed",
            eid,
            f"every recorded ε (PRV and RDP) of {n_entries} entries equals the "
            "accountant's recomputation from the recorded events",
        )
    ]


def _budget_check(eid: str, spent: float, settings: _Settings, rec: _Recomputed) -> Check:
    """ε spent (the budget's accountant) against the budget; names the first entry over."""
    budget, accountant = settings.budget, settings.accountant
    if not math.isfinite(spent):
        return _skip("budget", eid, "ε spent unknown: the ledger's entries cannot be read")
    if rec.records and not (spent <= budget):

        def over(r: EntryRecord) -> bool:
            eps = r.recomputed_epsilon_rdp if accountant == "rdp" else r.recomputed_epsilon_prv
            return eps is None or eps > budget

        first = next((r for r in rec.records if over(r)), rec.records[-1])
        return _fail(
            "budget",
            eid,
            f"ε spent {spent:.4f} ({accountant.upper()}) exceeds the budget "
            f"{budget:g}; first over at entry {first.index}",
            entry=first.index,
            round_number=first.round_number,
        )
    return _pass("budget", eid, f"ε spent {spent:.4f} ({accountant.upper()}) within budget {budget:g}")


def _outlook(entries: Sequence[LedgerEntry], events: Sequence[MechanismEvent], spent: float,
             settings: _Settings) -> BudgetOutlook:
    """ε left and how many more rounds like the newest one the budget allows."""
    charges = [e for e in entries if not isinstance(e.event, ChargeRelease)]
    last = charges[-1].event if charges else None
    remaining = None
    if events and math.isfinite(spent):
        try:
            remaining = rounds_remaining(events, budget=settings.budget, delta=settings.delta,
                                         accountant=settings.accountant)
        except SecfedError:
            remaining = None
    return BudgetOutlook(
        remaining_epsilon=max(0.0, settings.budget - spent) if math.isfinite(spent) else None,
        rounds_remaining=remaining,
        accountant=settings.accountant,
        noise_multiplier=None if last is None else float(last.noise_multiplier),
        sample_rate=float(last.sample_rate) if isinstance(last, DPSGDEvent) else None,
        steps_per_round=int(last.steps) if isinstance(last, DPSGDEvent) else None,
    )


def audit_ledger(path: Path, *, pinned_key: bytes | None, federation_given: bool) -> LedgerAudit:
    """Re-verify one ledger; failures become checks naming the entry, never exceptions.

    The checks, in order: identity pinned, ledger integrity (the privacy package's path),
    entries readable, every ε recomputed, spend within budget.

    Args:
        path: the ledger file.
        pinned_key: the enterprise's Ed25519 key from federation.toml (None: not pinned).
        federation_given: whether a federation file was given (an unlisted enterprise fails).

    Raises:
        AuditError: the file is not a readable secfed ledger at all.
    """
    header = _header(path)
    eid = header["enterprise_id"]
    checks = [_identity_check(eid, pinned_key, federation_given)]
    integrity, verified = _integrity_check(path, eid, pinned_key)
    checks.append(integrity)
    entries, unreadable_check = _read_entries(path, eid)
    if unreadable_check is not None:
        checks.append(unreadable_check)
    settings = _settings(path, header, verified, pinned_key, checks)
    unreadable = unreadable_check is not None
    rec = _recompute(eid, entries, settings.delta, unreadable)
    checks.extend(_recompute_checks(eid, rec, len(entries), unreadable))
    spent = rec.eps_rdp if settings.accountant == "rdp" else rec.eps_prv
    checks.append(_budget_check(eid, spent, settings, rec))
    report = EnterpriseReport(
        enterprise_id=eid,
        ledger_path=str(path),
        identity_public_key=None if settings.verify_key is None else settings.verify_key.hex(),
        identity_pinned=pinned_key is not None,
        budget_epsilon=settings.budget,
        delta=settings.delta,
        epsilon_prv=rec.eps_prv if math.isfinite(rec.eps_prv) else None,
        epsilon_rdp=rec.eps_rdp if math.isfinite(rec.eps_rdp) else None,
        recorded_epsilon_prv=entries[-1].eps_prv if entries else 0.0,
        recorded_epsilon_rdp=entries[-1].eps_rdp if entries else 0.0,
        rounds=tuple(e.round_number for e in entries),
        entries=tuple(rec.records),
        outlook=_outlook(entries, rec.events, spent, settings),
        head_hash=entries[-1].entry_hash.hex() if entries else None,
    )
    return LedgerAudit(report=report, checks=tuple(checks), entries=entries,
                       verify_key=settings.verify_key)


def _head_check(eid: str, up: Any, key: bytes | None,
                entries: Sequence[LedgerEntry]) -> Check | None:
    """One stored upload's signed ledger head against the ledger; ``None`` when it matches.

    Flags a head that does not parse, names another enterprise, is not signed by the
    enterprise's key, names an entry the ledger no longer has (truncated), differs from the
    ledger's entry (rewritten), or points at an entry charged for another round.
    """
    where = {"round_number": up.round_number}
    try:
        head = LedgerHead.from_bytes(up.ledger_head)
    except MessageFormatError as exc:
        return _fail("transcript_heads", eid,
                     f"round {up.round_number}: stored ledger head is malformed ({exc})", **where)
    if head.enterprise_id != eid:
        return _fail("transcript_heads", eid,
                     f"round {up.round_number}: upload carries the head of "
                     f"{head.enterprise_id!r}", **where)
    try:
        if key is None:
            raise InvalidSignature()
        head.verify(key)
    except InvalidSignature:
        return _fail("transcript_heads", eid,
                     f"round {up.round_number}: ledger head (entry {head.index}) "
                     "is not signed by the enterprise's identity key", entry=head.index, **where)
    if head.index == 0 or head.index > len(entries):
        return _fail(
            "transcript_heads",
            eid,
            f"round {up.round_number}: the coordinator holds a signed head for entry "
            f"{head.index} but the ledger has {len(entries)} entries "
            + (
                "(no charge recorded for an upload)"
                if head.index == 0
                else "(ledger truncated: an entry was deleted)"
            ),
            entry=head.index,
            **where,
        )
    entry = entries[head.index - 1]
    if entry.index != head.index or not constant_time_equal(entry.entry_hash, head.entry_hash):
        return _fail("transcript_heads", eid,
                     f"round {up.round_number}: entry {head.index}'s hash differs from the signed "
                     "head the coordinator stored (ledger rewritten after the upload)",
                     entry=head.index, **where)
    if entry.round_number != up.round_number:
        return _fail("transcript_heads", eid,
                     f"round {up.round_number}: upload's ledger head points at entry {head.index}, "
                     f"charged for round {entry.round_number}", entry=head.index, **where)
    return None


def _round_checks(eid: str, uploads: Sequence[Any], transcript: Transcript,
                  entries: Sequence[LedgerEntry]) -> list[Check]:
    """Uploads with no charge for their round, and survivors with no upload in the transcript."""
    failures: list[Check] = []
    charged_rounds = {e.round_number for e in entries}
    uploaded = {u.round_number for u in uploads}
    for r in sorted(uploaded - charged_rounds):
        failures.append(
            _fail(
                "transcript_rounds",
                eid,
                f"round {r}: the coordinator accepted an upload from {eid!r} "
                "but the ledger has no charge for that round",
                round_number=r,
            )
        )
    for rnd in transcript.rounds:
        if eid in rnd.survivors and rnd.round_number not in uploaded:
            failures.append(
                _fail(
                    "transcript_rounds",
                    eid,
                    f"round {rnd.round_number}: {eid!r} is a survivor but no "
                    "upload with a ledger head is in the transcript",
                    round_number=rnd.round_number,
                )
            )
    return failures


def check_transcript(
    audits: Sequence[LedgerAudit], transcript: Transcript, roster: Mapping[str, bytes]
) -> list[Check]:
    """Match each signed ledger head the coordinator stored with the audited ledgers
    (:func:`_head_check` per upload, :func:`_round_checks` per enterprise)."""
    checks: list[Check] = []
    for audit in audits:
        eid = audit.report.enterprise_id
        uploads = [u for u in transcript.uploads if u.sender == eid]
        key = roster.get(eid, audit.verify_key)
        heads = [c for up in uploads
                 if (c := _head_check(eid, up, key, audit.entries)) is not None]
        rounds = _round_checks(eid, uploads, transcript, audit.entries)
        checks.extend(heads + rounds)
        if not heads:
            checks.append(
                _pass(
                    "transcript_heads",
                    eid,
                    f"{len(uploads)} signed ledger heads in the transcript match the ledger",
                )
            )
        if not rounds:
            checks.append(
                _pass(
                    "transcript_rounds",
                    eid,
                    "every round the coordinator took an upload from is charged in the ledger",
                )
            )
    # Enterprises whose ledgers were not given fail in check_ledgers_supplied.
    return checks


def check_ledgers_supplied(audits: Sequence[LedgerAudit], transcript: Transcript,
                           roster: Mapping[str, bytes]) -> list[Check]:
    """With a transcript, every enterprise of the federation (roster, and everyone the
    transcript names) must have its ledger audited: a ledger left out -- lost, or withheld
    because it was rolled back -- fails the audit instead of being skipped."""
    given = {a.report.enterprise_id for a in audits}
    named = set(roster)
    for rnd in transcript.rounds:
        named.update(rnd.participants)
    named.update(u.sender for u in transcript.uploads)
    missing = sorted(named - given)
    if missing:
        return [_fail("ledger_supplied", e, f"enterprise {e!r} is in the federation but its "
                      "ledger was not given: its spending cannot be verified") for e in missing]
    return [_pass("ledger_supplied", "federation",
                  f"the ledgers of all {len(named)} enterprises in the federation were audited")]


def _links(seals: Sequence[TranscriptSeal]) -> dict[int, bytes]:
    return {s.round_number: s.link for s in seals}


def check_transcript_signed(transcript: Transcript, *, federation: str | None,
                            coordinator_key: bytes | None) -> list[Check]:
    """The coordinator's chained signatures over its closed rounds: each link signed by the
    pinned coordinator key over the rows the file holds now, chained to the previous round's
    link; every closed round but the newest must be sealed (the newest may still be in flight)."""
    subject = "coordinator"
    if coordinator_key is None or federation is None:
        return [_skip("transcript_signed", subject,
                      "no federation file (--federation): the coordinator's key is not pinned")]
    if transcript.seals is None:
        return [_fail("transcript_signed", subject,
                      "the transcript holds no signatures (table transcript_signatures missing)")]
    failures: list[Check] = []
    by_round = {s.round_number: s for s in transcript.seals}
    rounds = [r.round_number for r in transcript.rounds]
    for seal in transcript.seals:
        where = {"round_number": seal.round_number}
        before = by_round.get(seal.round_number - 1)
        if seal.round_number != 1 and before is None:
            failures.append(_fail("transcript_signed", subject,
                                  f"round {seal.round_number}: sealed but round "
                                  f"{seal.round_number - 1} is not (chain broken)", **where))
        else:
            expected = GENESIS_LINK if before is None else before.link
            if not constant_time_equal(seal.previous_link, expected):
                failures.append(_fail("transcript_signed", subject,
                                      f"round {seal.round_number}: previous link is not round "
                                      f"{seal.round_number - 1}'s (chain broken)", **where))
        message = transcript_link_message(federation=federation, round_number=seal.round_number,
                                          previous_link=seal.previous_link,
                                          digest=seal.digest or bytes(32))
        try:
            if seal.digest is None:
                raise InvalidSignature()
            verify_signature(coordinator_key, seal.signature, message)
        except InvalidSignature:
            failures.append(_fail("transcript_signed", subject,
                                  f"round {seal.round_number}: the coordinator's signature does "
                                  "not verify over the rows the transcript holds now (rewritten)",
                                  **where))
        link = transcript_link(federation=federation, round_number=seal.round_number,
                               previous_link=seal.previous_link, digest=seal.digest or bytes(32))
        if not constant_time_equal(link, seal.link):
            failures.append(_fail("transcript_signed", subject,
                                  f"round {seal.round_number}: stored link is not the signed one",
                                  **where))
    unsealed = [r for r in rounds if r not in by_round]
    newest = max(rounds, default=0)
    for r in unsealed:
        if r != newest:
            failures.append(_fail("transcript_signed", subject,
                                  f"round {r}: closed by a later round but not signed",
                                  round_number=r))
    tail = f"; round {newest} not sealed yet (in flight)" if newest in unsealed else ""
    return failures or [_pass("transcript_signed", subject,
                              f"{len(transcript.seals)} rounds sealed by the pinned coordinator "
                              f"key, each chained to the one before{tail}")]


def check_receipts(audit: LedgerAudit, path: Path, *, federation: str | None,
                   coordinator_key: bytes | None, transcript: Transcript | None) -> list[Check]:
    """The coordinator's receipts the ledger keeps: each signed by the pinned coordinator key,
    naming an entry the ledger still has (same hash, same round); with a transcript, each
    receipted head is the one the transcript holds for that round, and each receipt's
    previous-round link is the transcript's -- a ledger rolled back together with the
    transcript is caught by the receipts any ledger kept (its own or another enterprise's)."""
    eid = audit.report.enterprise_id
    if coordinator_key is None:
        return [_skip("ledger_receipts", eid,
                      "no federation file (--federation): the coordinator's key is not pinned")]
    try:
        receipts: list[LedgerReceipt] = read_receipts(path)
        verify_receipts(audit.entries, receipts, enterprise_id=eid,
                        coordinator_key=coordinator_key, federation=federation)
    except LedgerVerificationError as exc:
        return [_fail("ledger_receipts", eid, str(exc), entry=exc.entry)]
    except LedgerError as exc:
        return [_fail("ledger_receipts", eid, str(exc))]
    failures: list[Check] = []
    if transcript is not None:
        heads = {(u.round_number, u.sender): u.ledger_head for u in transcript.uploads
                 if u.stage == "upload"}
        rounds = {r.round_number for r in transcript.rounds}
        links = _links(transcript.seals or ())
        for rc in receipts:
            where = {"round_number": rc.round_number}
            if rc.round_number not in rounds:
                failures.append(_fail("ledger_receipts", eid,
                                      f"round {rc.round_number}: the coordinator receipted a head "
                                      "but the transcript has no such round (transcript rolled "
                                      "back or truncated)", **where))
                continue
            stored = heads.get((rc.round_number, eid))
            if rc.stage == "upload" and (stored is None
                                         or not constant_time_equal(stored, rc.head)):
                failures.append(_fail("ledger_receipts", eid,
                                      f"round {rc.round_number}: the receipted upload head is not "
                                      "the one the transcript holds (transcript rewritten)",
                                      **where))
                continue
            want = GENESIS_LINK if rc.round_number == 1 else links.get(rc.round_number - 1)
            if want is None or not constant_time_equal(want, rc.previous_link):
                failures.append(_fail("ledger_receipts", eid,
                                      f"round {rc.round_number}: the receipt pins a transcript up "
                                      f"to round {rc.round_number - 1} that differs from the one "
                                      "given (transcript rolled back or re-signed)", **where))
    return failures or [_pass("ledger_receipts", eid,
                              f"{len(receipts)} coordinator receipts verify and match the ledger"
                              + (" and the transcript" if transcript is not None else ""))]


def _instant(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


def check_outbound(enterprise_id: str, log: OutboundLog, audit: LedgerAudit) -> list[Check]:
    """Every message that left the site: a known protection, updates only masked or encrypted,
    and each round's update sent only after that round was charged in the ledger."""
    failures: list[Check] = []
    for m in log.messages:
        if m.protection not in PROTECTIONS:
            failures.append(
                _fail(
                    "outbound_protection",
                    enterprise_id,
                    f"round {m.round_number} {m.stage} message to {m.destination}: "
                    f"protection must be one of {sorted(PROTECTIONS)} "
                    f"(got {m.protection!r})",
                    round_number=m.round_number,
                )
            )
        elif m.stage in UPDATE_STAGES and m.protection not in UPDATE_PROTECTIONS:
            failures.append(
                _fail(
                    "outbound_protection",
                    enterprise_id,
                    f"round {m.round_number}: the update left as {m.protection!r}, "
                    f"not {sorted(UPDATE_PROTECTIONS)}",
                    round_number=m.round_number,
                )
            )
    checks = list(failures)
    if not failures:
        updates = sum(1 for m in log.messages if m.stage in UPDATE_STAGES)
        checks.append(
            _pass(
                "outbound_protection",
                enterprise_id,
                f"{len(log.messages)} outbound messages; all {updates} updates left "
                "masked or encrypted; no raw update left the site",
            )
        )
    charged = {}
    for e in audit.entries:  # the round's newest charge (the head its upload carries)
        if not isinstance(e.event, ChargeRelease):
            charged[e.round_number] = e
    late: list[Check] = []
    for m in log.messages:
        if m.stage not in UPDATE_STAGES:
            continue
        entry = charged.get(m.round_number)
        if entry is None:
            late.append(
                _fail(
                    "charged_before_send",
                    enterprise_id,
                    f"round {m.round_number}: an update left the site but the ledger "
                    "has no charge for that round",
                    round_number=m.round_number,
                )
            )
            continue
        sent = _instant(m.sent_at)
        if sent is not None and entry.timestamp > sent + 1e-3:
            late.append(
                _fail(
                    "charged_before_send",
                    enterprise_id,
                    f"round {m.round_number}: entry {entry.index} was charged after "
                    "the update left",
                    entry=entry.index,
                    round_number=m.round_number,
                )
            )
    checks.extend(late)
    if not late:
        checks.append(
            _pass(
                "charged_before_send",
                enterprise_id,
                "every update that left the site was charged in the ledger first",
            )
        )
    return checks


def check_releases(audit: LedgerAudit, *, transcript: Transcript | None,
                   outbound: OutboundLog | None) -> list[Check]:
    """Every release entry (a withdrawn charge) re-verified against what left the site: the
    coordinator's transcript must hold the round and no upload of this enterprise in it, and
    the site's outbound log (when given) no upload message in it. A release that fails is a
    FAIL naming the entry (the ledger then under-reports: the audit's ε above omits a round
    whose update did leave). Without a transcript the releases cannot be verified (skipped)."""
    eid = audit.report.enterprise_id
    releases = [e for e in audit.entries if isinstance(e.event, ChargeRelease)]
    if not releases:
        return [_pass("ledger_releases", eid, "no charge released")]
    if transcript is None:
        return [_skip("ledger_releases", eid,
                      f"{len(releases)} released charges (rounds "
                      f"{sorted({e.round_number for e in releases})}) not verifiable without the "
                      "coordinator's transcript (--transcript)")]
    rounds = {r.round_number for r in transcript.rounds}
    uploaded = {u.round_number for u in transcript.uploads
                if u.sender == eid and u.stage in UPDATE_STAGES}
    sent = set() if outbound is None else {m.round_number for m in outbound.messages
                                           if m.stage in UPDATE_STAGES}
    failures = []
    for entry in releases:
        r = entry.round_number
        where = {"entry": entry.index, "round_number": r}
        if r not in rounds:
            failures.append(_fail("ledger_releases", eid, f"entry {entry.index} releases the "
                                  f"charge of round {r}, which the transcript does not hold",
                                  **where))
        elif r in uploaded:
            failures.append(_fail("ledger_releases", eid, f"entry {entry.index} releases the "
                                  f"charge of round {r} but the coordinator accepted {eid!r}'s "
                                  "upload in that round (released wrongly: the ledger "
                                  "under-reports)", **where))
        elif r in sent:
            failures.append(_fail("ledger_releases", eid, f"entry {entry.index} releases the "
                                  f"charge of round {r} but the site's outbound log shows its "
                                  "update sent in that round (released wrongly)", **where))
    return failures or [_pass("ledger_releases", eid,
                              f"{len(releases)} released charges (rounds "
                              f"{sorted({e.round_number for e in releases})}): the transcript "
                              f"holds no upload of {eid!r} in those rounds"
                              + ("" if outbound is None else " and neither does its outbound log"))]
