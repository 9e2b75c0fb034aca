"""PNG plots of an audit report (matplotlib, Agg backend: no display, no network)."""

from __future__ import annotations

import io
import math
from collections import Counter

import matplotlib

matplotlib.use("Agg")  # headless; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from secfed.audit.model import AuditReport  # noqa: E402

__all__ = ["epsilon_plot", "participants_plot", "participants_by_round"]

_DPI = 110


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    # metadata without a software/date stamp so the bytes depend only on the data
    fig.savefig(buf, format="png", dpi=_DPI, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def epsilon_plot(report: AuditReport) -> bytes:
    """ε (PRV, recomputed by the auditor) after each round, one line per enterprise, budget dashed."""
    fig, ax = plt.subplots(figsize=(8.0, 3.8))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, ent in enumerate(report.enterprises):
        colour = colours[i % len(colours)]
        xs = [e.round_number for e in ent.entries]
        ys = [
            e.recomputed_epsilon_prv if e.recomputed_epsilon_prv is not None else float("nan")
            for e in ent.entries
        ]
        ax.plot(xs, ys, marker="o", color=colour, label=f"{ent.enterprise_id} ε (PRV)")
        if not math.isfinite(ent.budget_epsilon):
            continue  # a tampered header; the checks table says so
        ax.axhline(
            ent.budget_epsilon,
            color=colour,
            linestyle="--",
            linewidth=1,
            label=f"{ent.enterprise_id} budget {ent.budget_epsilon:g}",
        )
    ax.set_xlabel("round")
    ax.set_ylabel("ε spent (δ per enterprise)")
    ax.set_title("Privacy spent over rounds")
    top = max(
        [e.budget_epsilon for e in report.enterprises]
        + [e.epsilon_prv for e in report.enterprises if e.epsilon_prv is not None]
        + [1.0],
        key=lambda v: v if math.isfinite(v) else 0.0,
    )
    top = top if math.isfinite(top) else 1.0
    ax.set_ylim(0, top * 1.1)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    return _png(fig)


def participants_by_round(report: AuditReport) -> dict[int, tuple[int, int]]:
    """round -> (participants, survivors): from the transcript, else from the ledgers."""
    if report.federation is not None and report.federation.rounds:
        return {
            r.round_number: (len(r.participants), len(r.survivors))
            for r in report.federation.rounds
        }
    charged = Counter(e.round_number for ent in report.enterprises for e in ent.entries)
    return {r: (n, n) for r, n in sorted(charged.items())}


def participants_plot(report: AuditReport) -> bytes:
    """Participants per round: invited vs survived to the sum (transcript), else charged (ledgers)."""
    counts = participants_by_round(report)
    rounds = sorted(counts)
    from_transcript = report.federation is not None and bool(report.federation.rounds)
    fig, ax = plt.subplots(figsize=(7.0, 3.0))
    if from_transcript:
        width = 0.4
        ax.bar(
            [r - width / 2 for r in rounds], [counts[r][0] for r in rounds], width, label="invited"
        )
        ax.bar(
            [r + width / 2 for r in rounds],
            [counts[r][1] for r in rounds],
            width,
            label="survivors",
        )
        ax.set_title("Participants per round (coordinator transcript)")
    else:
        ax.bar(rounds, [counts[r][0] for r in rounds], 0.6, label="charged in audited ledgers")
        ax.set_title("Participants per round (from the audited ledgers)")
    ax.set_xlabel("round")
    ax.set_ylabel("enterprises")
    ax.set_xticks(rounds)
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)
