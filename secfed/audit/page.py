"""``report.html``: one self-contained page (inline CSS, base64 PNGs, no script, no network)."""

from __future__ import annotations

import base64
import json
from html import escape
from typing import Any

from secfed.audit.model import (
    SCHEMA_VERSION,
    AuditReport,
    Check,
    CheckStatus,
    EnterpriseReport,
    OutboundLog,
)

__all__ = ["render_html", "OUTBOUND_SHOWN"]

# outbound logs up to this many messages are shown open; longer ones fold under their counts
OUTBOUND_SHOWN = 12

_CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,"DejaVu Sans",Arial,sans-serif;margin:2em auto;
max-width:1100px;padding:0 1em;color:#1b1b1b;line-height:1.4;font-size:14px}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:2px solid #ddd;padding-bottom:.2em;
margin-top:1.6em}h3{margin-bottom:.3em}
table{border-collapse:collapse;width:100%;margin:.5em 0 1em}
th,td{border:1px solid #ccc;padding:3px 6px;text-align:left;vertical-align:top}
th{background:#f2f2f2}td.num{text-align:right;font-variant-numeric:tabular-nums}
code,.mono{font-family:"DejaVu Sans Mono",Menlo,Consolas,monospace;font-size:.9em;
word-break:break-all}
.verdict{padding:.6em 1em;border-radius:4px;font-weight:bold;font-size:1.2em;margin:.6em 0}
.pass{background:#e3f4e3;color:#145214}.fail{background:#fbe3e3;color:#8a1010}
.skipped{background:#f4f0dc;color:#5c4d00}
td.pass,td.fail,td.skipped{font-weight:bold}
img{max-width:100%;height:auto;border:1px solid #ddd}
details.outbound{margin:.4em 0 1em}details.outbound summary{cursor:pointer}
.muted{color:#666}ul{margin-top:.3em}
@media print{body{margin:0;max-width:none;font-size:11px}h2{page-break-after:avoid}
table,img{page-break-inside:avoid}.verdict{border:2px solid #000}}
"""


def _e(value: Any) -> str:
    return escape(str(value), quote=True)


def _num(value: float | None, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _status_cell(status: CheckStatus) -> str:
    return f'<td class="{status.value}">{status.value.upper()}</td>'


def _table(headers: list[str], rows: list[str], *, table_id: str | None = None) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    ident = f' id="{_e(table_id)}"' if table_id else ""
    return f"<table{ident}><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _enterprise_status(report: AuditReport, enterprise_id: str) -> CheckStatus:
    mine = [c for c in report.checks if c.subject == enterprise_id]
    if any(c.status is CheckStatus.FAIL for c in mine):
        return CheckStatus.FAIL
    return CheckStatus.PASS


def _summary(report: AuditReport) -> str:
    rows = []
    for ent in report.enterprises:
        o = ent.outlook
        rows.append(
            "<tr>"
            f"<td>{_e(ent.enterprise_id)}</td>"
            f'<td class="num">{ent.budget_epsilon:g}</td>'
            f'<td class="num">{_num(ent.epsilon_prv)}</td>'
            f'<td class="num">{_num(ent.epsilon_rdp)}</td>'
            f'<td class="num">{ent.delta:.3g}</td>'
            f'<td class="num">{len(ent.rounds)}</td>'
            f'<td class="num">{_num(o.remaining_epsilon)}</td>'
            f'<td class="num">{_e("—" if o.rounds_remaining is None else o.rounds_remaining)}</td>'
            f"{_status_cell(_enterprise_status(report, ent.enterprise_id))}"
            "</tr>"
        )
    return _table(
        [
            "enterprise",
            "budget ε",
            "ε spent (PRV)",
            "ε spent (RDP)",
            "δ",
            "rounds",
            "remaining ε",
            "rounds still allowed",
            "verdict",
        ],
        rows,
        table_id="epsilon-table",
    )


def _checks(checks: tuple[Check, ...]) -> str:
    """The checks table; the entry and round columns only when some check names one."""
    order = {CheckStatus.FAIL: 0, CheckStatus.SKIPPED: 1, CheckStatus.PASS: 2}
    with_entry = any(c.entry is not None for c in checks)
    with_round = any(c.round_number is not None for c in checks)
    rows = []
    for c in sorted(checks, key=lambda c: (order[c.status], c.subject, c.name)):
        cells = f"{_status_cell(c.status)}<td>{_e(c.name)}</td><td>{_e(c.subject)}</td>"
        if with_entry:
            cells += f'<td class="num">{_e("" if c.entry is None else c.entry)}</td>'
        if with_round:
            cells += f'<td class="num">{_e("" if c.round_number is None else c.round_number)}</td>'
        rows.append(f"<tr>{cells}<td>{_e(c.detail)}</td></tr>")
    headers = ["verdict", "check", "subject"] + (["entry"] if with_entry else []) \
        + (["round"] if with_round else []) + ["detail"]
    return _table(headers, rows, table_id="checks-table")


def _mechanism(mech: dict[str, Any]) -> str:
    kind = mech.get("kind", "?")
    params = ", ".join(f"{k}={v}" for k, v in mech.items() if k not in ("kind", "v"))
    return f"<code>{_e(kind)}</code> {_e(params)}"


def _outbound(log: OutboundLog | None) -> str:
    if log is None:
        return '<p class="muted">No participant state database given (<code>--outbound</code>).</p>'
    counts = ", ".join(f"{_e(k)}: {v}" for k, v in sorted(log.by_protection.items()))
    rows = [
        "<tr>"
        f'<td class="num">{m.round_number}</td><td>{_e(m.stage)}</td><td>{_e(m.destination)}</td>'
        f'<td class="num">{m.size_bytes}</td><td>{_e(m.protection)}</td>'
        f'<td class="mono">{_e(m.sha256[:16])}…</td><td>{_e(m.sent_at or "")}</td></tr>'
        for m in log.messages
    ]
    table = _table(
        ["round", "stage", "destination", "bytes", "protection", "sha256", "sent at"], rows
    )
    said = f"From <code>{_e(log.source)}</code>: {len(log.messages)} messages ({counts})"
    if len(log.messages) <= OUTBOUND_SHOWN:
        return f"<p>{said}.</p>{table}"
    # a long log folds: the counts are the summary, every message one click away
    return (f'<details class="outbound"><summary>{said}; show every message</summary>'
            f"{table}</details>")


def _enterprise(ent: EnterpriseReport) -> str:
    ident = (
        f"<code>{_e(ent.identity_public_key)}</code> "
        + ("(pinned in federation.toml)" if ent.identity_pinned else "(<b>not pinned</b>)")
        if ent.identity_public_key
        else "<b>no pinned identity</b>: signatures not checked against a trusted key"
    )
    o = ent.outlook
    basis = (
        f"at σ={o.noise_multiplier:g}, q={o.sample_rate:g}, {o.steps_per_round} steps per round "
        f"({o.accountant.upper()} accountant)"
        if o.noise_multiplier is not None
        else "no round charged yet"
    )
    rows = [
        "<tr>"
        f'<td class="num">{en.index}</td><td class="num">{en.round_number}</td>'
        f"<td>{_mechanism(en.mechanism)}</td>"
        f'<td class="num">{_num(en.recorded_epsilon_prv)}</td>'
        f'<td class="num">{_num(en.recomputed_epsilon_prv)}</td>'
        f'<td class="num">{_num(en.recorded_epsilon_rdp)}</td>'
        f'<td class="num">{_num(en.recomputed_epsilon_rdp)}</td>'
        f'<td class="mono">{_e(en.entry_hash[:16])}…</td></tr>'
        for en in ent.entries
    ]
    return (
        f'<section class="enterprise" id="enterprise-{_e(ent.enterprise_id)}">'
        f"<h3>{_e(ent.enterprise_id)}</h3>"
        f"<p>Ledger <code>{_e(ent.ledger_path)}</code>; identity {ident}.<br>"
        f"Budget ε={ent.budget_epsilon:g}, δ={ent.delta:.3g}; spent ε={_num(ent.epsilon_prv)} (PRV), "
        f"{_num(ent.epsilon_rdp)} (RDP); remaining {_num(o.remaining_epsilon)}, which allows "
        f"<b>{_e('—' if o.rounds_remaining is None else o.rounds_remaining)}</b> more rounds "
        f"{_e(basis)}.</p>"
        "<h4>Mechanism per round (ε after the entry: recorded vs recomputed)</h4>"
        + _table(
            [
                "entry",
                "round",
                "mechanism",
                "ε PRV recorded",
                "ε PRV recomputed",
                "ε RDP recorded",
                "ε RDP recomputed",
                "entry hash",
            ],
            rows,
        )
        + "<h4>Outbound log</h4>"
        + _outbound(ent.outbound)
        + "</section>"
    )


def _federation(report: AuditReport) -> str:
    fed = report.federation
    if fed is None:
        return '<p class="muted">No federation.toml or transcript given.</p>'
    settings = "".join(
        f"<tr><th>{_e(k)}</th><td><code>{_e(json.dumps(v, sort_keys=True))}</code></td></tr>"
        for k, v in sorted(fed.settings.items())
    )
    roster = "".join(
        f"<tr><td>{_e(k)}</td><td class='mono'>{_e(v)}</td></tr>"
        for k, v in sorted(fed.roster.items())
    )
    rounds = [
        "<tr>"
        f'<td class="num">{r.round_number}</td><td>{_e(r.mode)}</td><td>{_e(r.status)}</td>'
        f'<td class="num">{_e("" if r.threshold is None else r.threshold)}</td>'
        f"<td>{_e(', '.join(r.participants))}</td><td>{_e(', '.join(r.survivors))}</td></tr>"
        for r in fed.rounds
    ]
    return (
        f"<p>Federation <b>{_e(fed.name or '?')}</b>"
        + (f" from <code>{_e(fed.source)}</code>" if fed.source else "")
        + ".</p>"
        + (f"<table><tbody>{settings}</tbody></table>" if settings else "")
        + (f"<h4>Pinned identities</h4><table><tbody>{roster}</tbody></table>" if roster else "")
        + "<h4>Rounds (coordinator transcript)</h4>"
        + (
            _table(["round", "mode", "status", "threshold", "participants", "survivors"], rounds)
            if rounds
            else '<p class="muted">No transcript given (<code>--transcript</code>).</p>'
        )
    )


def _contributions(section: dict[str, Any] | None) -> str:
    """Per probed round: norm estimates, exclusions, shares and revealed scalars; then each
    enterprise's cumulative share with its participation; then the rounds without probes."""
    if section is None:
        return ('<p class="muted">No probe outcomes in the transcript (probes = 0, ckks rounds, '
                "or no <code>--transcript</code>): nothing beyond the sum was revealed.</p>")
    parts = [f'<p id="revealed">{_e(section["statement"])}</p>']
    for r in section["rounds"]:
        rows = []
        for p in r["participants"]:
            share = r["shares"].get(p)
            state = ("excluded (norm check)" if p in r["excluded"]
                     else "disputed pair term" if p in r["disputed"]
                     else "in sum" if p in r["survivors"] else "not in sum")
            rows.append(
                f"<tr><td>{_e(p)}</td><td class='num'>{_num(r['norm_estimates'].get(p))}</td>"
                f"<td>{_e(state)}</td><td class='num'>{_num(share, 6)}</td>"
                f"<td class='num'>{_e(r['revealed_scalars'].get(p, 0))}</td></tr>"
            )
        parts.append(
            f"<h4>Round {_e(r['round'])} ({_e(r['mode'])}, {_e(r['status'])}): k = {_e(r['probes'])}"
            f" probes, exclusion above {_num(r['exclusion_limit'])}; excluded: "
            f"{_e(', '.join(r['excluded']) or 'none')}</h4>"
            + _table(["enterprise", "norm estimate", "", "share", "scalars revealed"], rows,
                     table_id=f"contributions-round-{r['round']}")
        )
    cumulative = [
        f"<tr><td>{_e(p)}</td><td class='num'>{_num(row['share'], 6)}</td>"
        f"<td class='num'>{_e(row['in_sum'])} / {_e(row['rounds'])}</td>"
        f"<td class='num'>{_e(row['excluded'])}</td><td class='num'>{_e(row['revealed_scalars'])}</td></tr>"
        for p, row in section["cumulative"].items()
    ]
    parts.append(
        "<h4>Cumulative (done probed rounds; a missed or excluded round counts as share 0)</h4>"
        + _table(["enterprise", "mean share", "in sum / asked", "excluded", "scalars revealed"],
                 cumulative, table_id="contributions-cumulative")
    )
    if section["unprobed_rounds"]:
        parts.append("<p>Rounds without verified probes: " + "; ".join(
            f"round {_e(u['round'])} ({_e(u['mode'])}): {_e(u['reason'])}"
            for u in section["unprobed_rounds"]) + ".</p>")
    return "".join(parts)


def _img(alt: str, png: bytes | None, ident: str) -> str:
    if not png:
        return ""
    data = base64.b64encode(png).decode("ascii")
    return f'<figure><img id="{ident}" alt="{_e(alt)}" src="data:image/png;base64,{data}"></figure>'


def render_html(report: AuditReport, *, plots: dict[str, bytes]) -> str:
    """The report page; ``plots`` maps plot names (``epsilon``, ``participants``) to PNG bytes."""
    verdict = report.verdict
    failures = report.failures
    failing = (
        "<ul>"
        + "".join(
            f"<li><b>{_e(c.subject)}</b>: {_e(c.name)}"
            + (f" (entry {c.entry})" if c.entry is not None else "")
            + f" — {_e(c.detail)}</li>"
            for c in failures
        )
        + "</ul>"
        if failures
        else ""
    )
    inputs = report.inputs
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        "<title>secfed privacy budget audit</title>"
        f"<style>{_CSS}</style></head><body>"
        "<h1>Privacy budget audit</h1>"
        f'<p class="muted">Generated {_e(report.generated_at)} by secfed {_e(report.secfed_version)}'
        f" · report schema {SCHEMA_VERSION} · ledgers: "
        + ", ".join(f"<code>{_e(p)}</code>" for p in inputs.get("ledgers", []))
        + "</p>"
        f'<div id="verdict" class="verdict {verdict}">Verdict: {verdict.upper()} — '
        f"{len(failures)} failed of {len(report.checks)} checks</div>{failing}"
        "<p>Every ε below was recomputed by this audit from the mechanism events recorded in the "
        "ledger; the hash chain and each entry's Ed25519 signature were verified against the "
        "identity pinned in the federation file, and the ledger heads were cross-checked against "
        "the coordinator's transcript where given.</p>"
        "<h2>Privacy spent per enterprise</h2>"
        + _summary(report)
        + _img(
            "ε after each round, one panel per enterprise: ε gated (RDP, what the budget "
            "enforces) against the budget, and ε reported (PRV) beside it",
            plots.get("epsilon"),
            "plot-epsilon",
        )
        + _img("participants per round", plots.get("participants"), "plot-participants")
        + "<h2>Verification checks</h2>"
        + _checks(report.checks)
        + "<h2>Enterprises</h2>"
        + "".join(_enterprise(ent) for ent in report.enterprises)
        + "<h2>Federation</h2>"
        + _federation(report)
        + '<h2 id="contributions">Contributions and norm checks</h2>'
        + _contributions(report.contributions)
        + "<h2>Assumptions the guarantee rests on</h2><ul>"
        + "".join(f"<li><b>{_e(a.key)}</b>: {_e(a.text)}</li>" for a in report.assumptions)
        + "</ul></body></html>\n"
    )
