"""PNG plots of an audit report (matplotlib, Agg backend: no display, no network).

The ε plot draws one small panel per enterprise, so enterprises whose curves are equal never hide
each other: in each, ε as the budget gate computes it (RDP, what the ledger enforces) against the
budget, and ε as reported (PRV, a tighter bound on the same events) beside it. Legends sit
outside the plotting area, never over data.
"""

from __future__ import annotations

import io
import math
from collections import Counter

import matplotlib

matplotlib.use("Agg")  # headless; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from secfed.audit.model import AuditReport, EnterpriseReport  # noqa: E402

__all__ = ["epsilon_plot", "epsilon_figure", "participants_plot", "participants_figure",
           "participants_by_round"]

_DPI = 110
_PANEL_COLUMNS = 3
GATED_LABEL = "ε gated (RDP): what the budget enforces"
REPORTED_LABEL = "ε reported (PRV)"
BUDGET_LABEL = "budget"
_GATED = dict(color="#1f4e9c", marker="o", markersize=4, linewidth=2.0, linestyle="-")
_REPORTED = dict(color="#d9760b", marker="s", markersize=3, linewidth=1.3, linestyle="--")


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    # metadata without a software/date stamp so the bytes depend only on the data
    fig.savefig(buf, format="png", dpi=_DPI, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def _finite(value: float | None) -> float:
    return value if value is not None and math.isfinite(value) else float("nan")


def _top(report: AuditReport) -> float:
    """The shared y limit: the largest budget or ε shown (a tampered inf/NaN ignored)."""
    values = [1.0]
    for ent in report.enterprises:
        values.append(ent.budget_epsilon)
        values += [e.recomputed_epsilon_rdp or 0.0 for e in ent.entries]
        values += [e.recomputed_epsilon_prv or 0.0 for e in ent.entries]
    return max(v for v in values if math.isfinite(v)) * 1.1


def _panel(ax, ent: EnterpriseReport) -> None:
    xs = [e.round_number for e in ent.entries]
    ax.plot(xs, [_finite(e.recomputed_epsilon_rdp) for e in ent.entries], label=GATED_LABEL,
            **_GATED)
    ax.plot(xs, [_finite(e.recomputed_epsilon_prv) for e in ent.entries], label=REPORTED_LABEL,
            **_REPORTED)
    if math.isfinite(ent.budget_epsilon):  # a tampered header: the checks table says so
        ax.axhline(ent.budget_epsilon, color="#8a1010", linestyle=":", linewidth=1.4,
                   label=BUDGET_LABEL)
    budget = f"{ent.budget_epsilon:g}" if math.isfinite(ent.budget_epsilon) else "?"
    ax.set_title(f"{ent.enterprise_id}  (budget {budget}, δ {ent.delta:.0e})", fontsize=8.5)
    ax.grid(True, alpha=0.3)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.tick_params(labelsize=7.5)


def epsilon_figure(report: AuditReport) -> Figure:
    """The ε plot as a figure: one panel per enterprise (the caller closes or renders it)."""
    n = max(1, len(report.enterprises))
    cols = min(_PANEL_COLUMNS, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols + 0.6, 2.4 * rows + 0.7),
                             sharex=True, sharey=True, squeeze=False, layout="constrained")
    panels = list(axes.flat)
    for ax, ent in zip(panels, report.enterprises, strict=False):
        _panel(ax, ent)
    for ax in panels[len(report.enterprises):]:
        ax.set_visible(False)
    panels[0].set_ylim(0, _top(report))
    for i, ax in enumerate(panels[:len(report.enterprises)]):
        if i + cols >= len(report.enterprises):  # no visible panel below this one
            ax.set_xlabel("round", fontsize=8.5)
            ax.xaxis.set_tick_params(labelbottom=True)
    fig.supylabel("ε after the round", fontsize=9)
    handles, labels = panels[0].get_legend_handles_labels()
    # in its own strip below every panel (the layout makes room): a legend never covers a curve
    fig.legend(handles, labels, loc="outside lower center", ncol=3, fontsize=8, frameon=False)
    return fig


def epsilon_plot(report: AuditReport) -> bytes:
    """ε after each round per enterprise (gated RDP vs budget, reported PRV beside it), PNG."""
    return _png(epsilon_figure(report))


def participants_by_round(report: AuditReport) -> dict[int, tuple[int, int]]:
    """round -> (participants, survivors): from the transcript, else from the ledgers."""
    if report.federation is not None and report.federation.rounds:
        return {
            r.round_number: (len(r.participants), len(r.survivors))
            for r in report.federation.rounds
        }
    charged = Counter(e.round_number for ent in report.enterprises for e in ent.entries)
    return {r: (n, n) for r, n in sorted(charged.items())}


def participants_figure(report: AuditReport) -> Figure:
    """Participants per round as a figure, its legend above the axes (never over a bar)."""
    counts = participants_by_round(report)
    rounds = sorted(counts)
    from_transcript = report.federation is not None and bool(report.federation.rounds)
    fig, ax = plt.subplots(figsize=(7.0, 3.2))
    if from_transcript:
        width = 0.4
        ax.bar([r - width / 2 for r in rounds], [counts[r][0] for r in rounds], width,
               label="invited")
        ax.bar([r + width / 2 for r in rounds], [counts[r][1] for r in rounds], width,
               label="survivors")
        title = "Participants per round (coordinator transcript)"
    else:
        ax.bar(rounds, [counts[r][0] for r in rounds], 0.6, label="charged in audited ledgers")
        title = "Participants per round (from the audited ledgers)"
    ax.set_title(title, loc="left", fontsize=10, pad=22)
    ax.set_xlabel("round")
    ax.set_ylabel("enterprises")
    ax.set_xticks(rounds)
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=2, frameon=False,
              borderaxespad=0.2)
    fig.tight_layout()
    return fig


def participants_plot(report: AuditReport) -> bytes:
    """Participants per round: invited vs survived to the sum (transcript), else charged (ledgers)."""
    return _png(participants_figure(report))
