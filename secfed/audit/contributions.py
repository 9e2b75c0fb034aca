"""Contribution shares and norm-check exclusions, per round and cumulative (issue 17).

Reads a coordinator state database (``secfed aggregate``'s transcript): the ``probe_outcomes``
table the coordinator writes for every probed round (``RoundSpec.probes`` > 0) and the
``rounds`` table for who took part. A round's share of enterprise i is ``<u_i, U> / <U, U>``
over the survivors (they sum to 1); the cumulative share is the mean of its round shares over
the probed rounds it was a participant of (a round it missed, was excluded from or got no share
in counts as 0), so it rewards both quality and participation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from secfed.audit.sources import _open_readonly
from secfed.errors import AuditError

__all__ = [
    "RoundContributions",
    "ContributionLedger",
    "read_contributions",
    "audit_contributions",
    "REVEALED_STATEMENT",
]

# What the audit tells the reader each probed round revealed beyond the sum (issue 17).
REVEALED_STATEMENT = (
    "Beyond the sum, a probed round reveals to the coordinator k + 1 scalars of each "
    "enterprise's update: its inner products with k random +-1 probe vectors derived from every "
    "upload's digest after all uploads were in (the norm check), and one with the round's "
    "aggregate (the contribution share). All are post-processing of the DP-SGD update, so the "
    "record-level epsilon above is unchanged. ckks rounds and rounds with probes = 0 carry no "
    "verified probes and reveal nothing beyond the sum."
)


@dataclass(frozen=True)
class RoundContributions:
    """One probed round: who was asked, who is in the sum, and what the probes established."""

    round_number: int
    mode: str
    status: str
    participants: tuple[str, ...]
    survivors: tuple[str, ...]
    probes: int
    limit: float
    norm_estimates: dict[str, float]
    excluded: tuple[str, ...]
    shares: dict[str, float]
    unverified: tuple[str, ...]
    disputed: tuple[str, ...]
    without_share: tuple[str, ...]

    def revealed_scalars(self) -> dict[str, int]:
        """Scalars of its update each enterprise revealed: k probes if probed, +1 if it has a
        contribution term."""
        out = {p: self.probes for p in self.norm_estimates}
        for p in self.shares:
            out[p] = out.get(p, 0) + 1
        return out


@dataclass(frozen=True)
class ContributionLedger:
    """Every probed round, the rounds without probes (round, mode, why) and the cumulative
    shares of the done probed rounds."""

    rounds: tuple[RoundContributions, ...]
    cumulative: dict[str, dict[str, Any]] = field(default_factory=dict)
    unprobed: tuple[tuple[int, str, str], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "rounds": [
                {
                    "round": r.round_number, "mode": r.mode, "status": r.status,
                    "participants": list(r.participants), "survivors": list(r.survivors),
                    "probes": r.probes, "exclusion_limit": r.limit,
                    "norm_estimates": r.norm_estimates, "excluded": list(r.excluded),
                    "shares": r.shares, "unverified": list(r.unverified),
                    "disputed": list(r.disputed), "without_share": list(r.without_share),
                    "revealed_scalars": r.revealed_scalars(),
                }
                for r in self.rounds
            ],
            "cumulative": self.cumulative,
            "unprobed_rounds": [
                {"round": r, "mode": mode, "reason": why} for r, mode, why in self.unprobed
            ],
        }


def _cumulative(rounds: tuple[RoundContributions, ...]) -> dict[str, dict[str, Any]]:
    table: dict[str, dict[str, Any]] = {}
    for r in rounds:
        for p in r.participants:
            row = table.setdefault(p, {"rounds": 0, "in_sum": 0, "excluded": 0, "share_sum": 0.0,
                                       "revealed_scalars": 0})
            row["rounds"] += 1
            row["in_sum"] += p in r.survivors
            row["excluded"] += p in r.excluded
            row["share_sum"] += r.shares.get(p, 0.0)
            row["revealed_scalars"] += r.revealed_scalars().get(p, 0)
    for row in table.values():
        row["share"] = row["share_sum"] / row["rounds"] if row["rounds"] else 0.0
    return dict(sorted(table.items(), key=lambda kv: -float(kv[1]["share"])))


def read_contributions(path: str | Path) -> ContributionLedger:
    """Every probed round of the coordinator database at ``path`` and the cumulative shares.

    Raises:
        AuditError: the file is missing or unreadable, or holds no ``probe_outcomes`` table (a
            coordinator that never ran a probed round, or from before issue 17).
    """
    path = Path(path)
    what = "--transcript"
    with _open_readonly(path, what) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "probe_outcomes" not in tables or "rounds" not in tables:
            raise AuditError(
                f"{what} {str(path)!r} must hold the coordinator's rounds and probe_outcomes "
                "tables (a federation with probes = 0 has no contribution shares)"
            )
        rows = conn.execute(
            "SELECT r.round, r.mode, r.status, r.participants, r.survivors, p.outcome "
            "FROM probe_outcomes p JOIN rounds r ON r.round = p.round ORDER BY r.round"
        ).fetchall()
        bare = conn.execute(
            "SELECT round, mode FROM rounds WHERE round NOT IN (SELECT round FROM probe_outcomes) "
            "ORDER BY round"
        ).fetchall()
    rounds = []
    for rnd, mode, status, participants, survivors, outcome in rows:
        try:
            o = json.loads(outcome)
            rounds.append(RoundContributions(
                round_number=int(rnd), mode=str(mode), status=str(status),
                participants=tuple(json.loads(participants)),
                survivors=tuple(json.loads(survivors or "[]")),
                probes=int(o["probes"]), limit=float(o["limit"]),
                norm_estimates={k: float(v) for k, v in o["norm_estimates"].items()},
                excluded=tuple(o["excluded"]),
                shares={k: float(v) for k, v in o["contributions"].items()},
                unverified=tuple(o["unverified"]), disputed=tuple(o["disputed"]),
                without_share=tuple(o["without_share"]),
            ))
        except (ValueError, KeyError, TypeError) as exc:
            raise AuditError(f"{what}: probe outcome of round {rnd} is malformed: {exc}") from exc
    done = tuple(r for r in rounds if r.status == "done")
    unprobed = tuple(
        (int(rnd), str(mode), "ckks rounds carry no verified probes" if mode == "ckks"
         else "no probe outcome recorded (probes = 0, or the round ended before its probes)")
        for rnd, mode in bare
    )
    return ContributionLedger(tuple(rounds), _cumulative(done), unprobed)


def has_probe_outcomes(path: str | Path) -> bool:
    """Whether the coordinator database at ``path`` has a ``probe_outcomes`` table.

    Raises:
        AuditError: the file is missing or unreadable.
    """
    with _open_readonly(Path(path), "--transcript") as conn:
        return bool(conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type='table' AND name='probe_outcomes'"
        ).fetchone())


def audit_contributions(
    path: str | Path,
) -> tuple[dict[str, Any] | None, list[tuple[int, str, bool, str]]]:
    """The audit report's contributions section for the transcript at ``path`` (None when the
    coordinator never kept probe outcomes) and its consistency findings, one per probed round:
    ``(round, subject, ok, detail)``. A done probed round is consistent when no excluded
    enterprise is among its survivors, every share belongs to a survivor, and the shares sum to
    1 (within 1e-6) unless a pair dispute or a missing pair term left some survivor without one.

    Raises:
        AuditError: the file is unreadable or a probe outcome is malformed.
    """
    if not has_probe_outcomes(path):
        return None, []
    ledger = read_contributions(path)
    section = {**ledger.to_dict(), "statement": REVEALED_STATEMENT}
    findings: list[tuple[int, str, bool, str]] = []
    for r in ledger.rounds:
        if r.status != "done":
            continue
        subject = f"round {r.round_number}"
        wrong = sorted(set(r.excluded) & set(r.survivors))
        stray = sorted(set(r.shares) - set(r.survivors))
        total = sum(r.shares.values())
        complete = not (r.disputed or r.without_share)
        if wrong:
            findings.append((r.round_number, subject, False,
                             f"excluded enterprises {wrong} are among the survivors in the sum"))
        elif stray:
            findings.append((r.round_number, subject, False,
                             f"shares given to non-survivors {stray}"))
        elif complete and abs(total - 1.0) > 1e-6:
            findings.append((r.round_number, subject, False,
                             f"survivors' shares sum to {total:.9f}, not 1"))
        else:
            findings.append((r.round_number, subject, True,
                             f"k = {r.probes}; excluded {list(r.excluded) or 'none'}; shares of "
                             f"{len(r.shares)} survivors sum to {total:.9f}"))
    return section, findings
