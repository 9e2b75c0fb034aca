"""The audit's front door: ledgers (+ transcript, federation file, outbound logs) -> report."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from secfed import __version__
from secfed.audit.assumptions import assumptions_for
from secfed.audit.contributions import audit_contributions
from secfed.audit.model import (
    AuditReport,
    Check,
    CheckStatus,
    FederationSettings,
    OutboundLog,
)
from secfed.audit.sources import Transcript, read_outbound, read_transcript
from secfed.audit.verify import (
    LedgerAudit,
    audit_ledger,
    check_ledgers_supplied,
    check_outbound,
    check_receipts,
    check_releases,
    check_transcript,
    check_transcript_signed,
    read_enterprise_id,
)
from secfed.errors import AuditError, ConfigError

__all__ = ["build_report"]


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _federation_settings(
    path: Path | None, transcript: Transcript | None
) -> tuple[FederationSettings | None, dict[str, bytes], bytes | None]:
    roster: dict[str, bytes] = {}
    coordinator_key: bytes | None = None
    if path is None and transcript is None:
        return None, roster, None
    name: str | None = None
    settings: dict[str, Any] = {}
    if path is not None:
        from secfed.config import load_federation

        try:
            cfg = load_federation(path)
        except ConfigError as exc:
            raise AuditError(
                f"--federation {str(path)!r} is not a valid federation file: {exc}"
            ) from exc
        name = cfg.name
        roster = {e.id: e.public_key_bytes() for e in cfg.roster}
        coordinator_key = cfg.coordinator_public_key()
        settings = {
            "rounds": cfg.rounds,
            "mode_schedule": list(cfg.mode_schedule),
            "threshold": cfg.threshold,
            "min_participants": cfg.min_participants,
            "neighbours": cfg.neighbours,
            "dp": cfg.dp.model_dump(mode="json"),
            "encoding": {
                "vector_length": cfg.model.vector_length,
                "scale_bits": cfg.model.scale_bits,
                "ring_bits": cfg.model.ring_bits,
                "clip_bound": cfg.model.clip_bound,
            },
            "coordinator_url": cfg.coordinator_url,
        }
    fed = FederationSettings(
        name=name,
        source=None if path is None else str(path),
        settings=settings,
        roster={k: v.hex() for k, v in roster.items()},
        rounds=() if transcript is None else transcript.rounds,
    )
    return fed, roster, coordinator_key


def _with_sigma_used(
    fed: FederationSettings | None, audits: Sequence[LedgerAudit]
) -> FederationSettings | None:
    """Fill ``dp.noise_multiplier`` with the σ the ledgers record when federation.toml leaves it
    to be calibrated (null): the settings then show what was used, not an empty field.

    One number when every audited DP-SGD entry used the same σ, else enterprise -> σ (or the
    list of its σ values when one enterprise used several).
    """
    if fed is None or not isinstance(fed.settings.get("dp"), dict):
        return fed
    if fed.settings["dp"].get("noise_multiplier") is not None:
        return fed
    used: dict[str, list[float]] = {}
    for audit in audits:
        for entry in audit.report.entries:
            sigma = entry.mechanism.get("noise_multiplier")
            if entry.mechanism.get("kind") == "dpsgd" and isinstance(sigma, int | float):
                values = used.setdefault(audit.report.enterprise_id, [])
                if float(sigma) not in values:
                    values.append(float(sigma))
    if not used:
        return fed
    every = {v for values in used.values() for v in values}
    shown: Any = next(iter(every)) if len(every) == 1 else {
        eid: values[0] if len(values) == 1 else values for eid, values in sorted(used.items())
    }
    dp = {**fed.settings["dp"], "noise_multiplier": shown,
          "noise_multiplier_from": "calibrated to the budget; σ as the audited ledgers record it"}
    return dataclasses.replace(fed, settings={**fed.settings, "dp": dp})


def _match_outbound(
    outbound: Sequence[tuple[str | None, Path]], ledger_owner: dict[Path, str]
) -> dict[str, OutboundLog]:
    """Attach each outbound DB to an enterprise: named, or the ledger in the same kit directory."""
    by_dir = {p.resolve().parent: e for p, e in ledger_owner.items()}
    logs: dict[str, OutboundLog] = {}
    for name, db in outbound:
        owner = name or by_dir.get(Path(db).resolve().parent)
        if owner is None and len(ledger_owner) == 1:
            owner = next(iter(ledger_owner.values()))
        if owner is None or owner not in ledger_owner.values():
            raise AuditError(
                f"--outbound {str(db)!r} must belong to an audited enterprise: pass "
                f"ENTERPRISE=DB or keep it beside that enterprise's ledger (got {owner!r})"
            )
        if owner in logs:
            raise AuditError(f"--outbound given twice for enterprise {owner!r}")
        logs[owner] = read_outbound(db)
    return logs


def _owners(paths: Sequence[Path]) -> dict[Path, str]:
    """Each ledger file's enterprise (its header).

    Raises:
        AuditError: a file is not a ledger, or two belong to one enterprise.
    """
    owners: dict[Path, str] = {}
    for p in paths:
        eid = read_enterprise_id(p)
        if eid in owners.values():
            raise AuditError(f"ledgers must belong to distinct enterprises ({eid!r} given twice)")
        owners[p] = eid
    return owners


def build_report(
    *,
    ledgers: Sequence[str | Path],
    transcript: str | Path | None = None,
    federation: str | Path | None = None,
    outbound: Sequence[tuple[str | None, str | Path]] = (),
    clock: Callable[[], datetime] = _utc_now,
) -> AuditReport:
    """Re-verify every ledger and cross-check it; returns the report (failures are checks in it).

    Args:
        ledgers: each enterprise's ``ledger.sqlite``.
        transcript: the coordinator's ``state.sqlite`` (rounds and uploaded ledger heads).
        federation: ``federation.toml``; its roster pins the identity each ledger must be signed by.
        outbound: ``(enterprise id or None, participant state.sqlite)`` pairs.
        clock: the report's timestamp source.

    Raises:
        AuditError: an input cannot be read at all (a ledger that reads but fails verification
            is not an error here: it is a failed check in the report).
    """
    if not ledgers:
        raise AuditError("ledgers must name at least one ledger file (got none)")
    paths = [Path(p) for p in ledgers]
    transcript_data = None if transcript is None else read_transcript(transcript)
    fed, roster, coordinator_key = _federation_settings(
        None if federation is None else Path(federation), transcript_data
    )
    owners = _owners(paths)
    logs = _match_outbound([(n, Path(d)) for n, d in outbound], owners)

    audits: list[LedgerAudit] = []
    checks: list[Check] = []
    for p in paths:
        eid = owners[p]
        pinned = roster.get(eid)
        audit = audit_ledger(p, pinned_key=pinned, federation_given=federation is not None)
        if eid in logs:
            audit = dataclasses.replace(
                audit, report=dataclasses.replace(audit.report, outbound=logs[eid])
            )
        audits.append(audit)
        checks.extend(audit.checks)
        checks.extend(check_receipts(audit, p, federation=fed.name if fed else None,
                                     coordinator_key=coordinator_key,
                                     transcript=transcript_data))
        if eid in logs:
            checks.extend(check_outbound(eid, logs[eid], audit))
        else:
            checks.append(Check("outbound_protection", eid, CheckStatus.SKIPPED,
                                "no outbound log given (--outbound)"))
    contributions = None
    if transcript is not None:
        contributions, findings = audit_contributions(transcript)
        checks.extend(
            Check("probe_outcomes", subject, CheckStatus.PASS if ok else CheckStatus.FAIL, detail)
            for _, subject, ok, detail in findings
        )
    for audit in audits:
        checks.extend(check_releases(audit, transcript=transcript_data,
                                     outbound=logs.get(audit.report.enterprise_id)))
    if transcript_data is not None:
        checks.extend(check_transcript(audits, transcript_data, roster))
        checks.extend(check_ledgers_supplied(audits, transcript_data, roster))
        checks.extend(check_transcript_signed(transcript_data, federation=fed.name if fed else None,
                                              coordinator_key=coordinator_key))
    else:
        for a in audits:
            checks.append(
                Check(
                    "transcript_heads",
                    a.report.enterprise_id,
                    CheckStatus.SKIPPED,
                    "no coordinator transcript given (--transcript)",
                )
            )

    modes = [r.mode for r in transcript_data.rounds] if transcript_data else []
    if fed is not None and not modes:
        modes = list(fed.settings.get("mode_schedule", []))
    return AuditReport(
        generated_at=clock().isoformat(timespec="seconds"),
        secfed_version=__version__,
        inputs={
            "ledgers": [str(p) for p in paths],
            "transcript": None if transcript is None else str(transcript),
            "federation": None if federation is None else str(federation),
            "outbound": [str(d) for _, d in outbound],
        },
        enterprises=tuple(a.report for a in audits),
        federation=_with_sigma_used(fed, audits),
        assumptions=assumptions_for(modes),
        checks=tuple(checks),
        contributions=contributions,
    )
