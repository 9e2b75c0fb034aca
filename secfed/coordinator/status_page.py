"""The status page: one self-contained HTML document rendered from a :class:`StatusBoard`.

No script, no external asset (the CSS is inline, the icon a ``data:`` URL); the page reloads
itself with ``<meta http-equiv="refresh">`` every :data:`REFRESH_S` seconds. Every value is
escaped. Cells that tests read carry ``data-field`` attributes.
"""

from __future__ import annotations

import datetime as dt
import html
from typing import Any

from secfed.coordinator.status import REFRESH_S, StatusBoard

__all__ = ["render_page", "PAGE_CSP"]

# The page needs nothing but its own inline style and the data: icon.
PAGE_CSP = ("default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; "
            "form-action 'none'; frame-ancestors 'none'")

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.2em 2em;color:#1b1b1b;background:#fafafa}
h1{font-size:1.4em;margin:0 0 .2em}h2{font-size:1.1em;margin:1.4em 0 .4em}
table{border-collapse:collapse;background:#fff}th,td{padding:.25em .7em;border:1px solid #ddd;
text-align:left}td.n{text-align:right;font-variant-numeric:tabular-nums}
.muted{color:#666}.s-waiting{color:#555}.s-ready{color:#0a5a9c}.s-advertised{color:#0a5a9c}.s-uploaded{color:#0a6f3c}
.s-confirmed{color:#0a6f3c;font-weight:600}.s-dropped,.s-late{color:#a35b00;font-weight:600}
.s-refused-by-policy,.s-excluded{color:#a11;font-weight:600}.st-aborted{color:#a11}
.st-done{color:#0a6f3c}.bar{display:inline-block;height:.7em;background:#5b8def;vertical-align:middle}
.over{background:#c33}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return dt.datetime.fromtimestamp(ts, tz=dt.UTC).strftime("%H:%M:%S UTC")


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024 or unit == "MiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n:.1f} GiB"


def _round_section(snap: dict[str, Any]) -> str:
    r = snap["round"]
    if r is None:
        start = snap.get("start")
        if start is None:
            return '<p id="round" data-field="round-none">No round opened yet.</p>'
        left = max(0.0, start["deadline"] - snap["now"])
        return ('<p id="round" data-field="round-none">No round opened yet: waiting for the '
                f'sites to report ready (<b data-field="ready">{start["ready"]}</b> of '
                f'{start["roster"]}); round 1 opens when all are, or at '
                f'{_when(start["deadline"])} ({left:.0f} s left) at the latest.</p>')
    left = "" if r["deadline"] is None else f" ({max(0.0, r['deadline'] - snap['now']):.0f} s left)"
    return (
        f'<p id="round">Round <b data-field="round">{r["number"]}</b> of '
        f'<span data-field="rounds-planned">{snap["rounds_planned"]}</span>, mode '
        f'<b data-field="mode">{_e(r["mode"])}</b>, status <b data-field="status">'
        f'{_e(r["status"])}</b>, stage <b data-field="stage">{_e(r["stage"])}</b>, '
        f'deadline <span data-field="deadline" data-unix="{r["deadline"] or ""}">'
        f'{_when(r["deadline"])}{left}</span>.</p>')


def _enterprise_rows(snap: dict[str, Any]) -> str:
    target = snap["target_epsilon"]
    rows = []
    for e in snap["enterprises"]:
        eps = e["epsilon_rdp"]
        width = min(100.0, 100.0 * eps / target) if target else 0.0
        bound = "&ge; " if e["epsilon_is_lower_bound"] else ""
        share = "-" if e["contribution"] is None else f"{e['contribution']:.3f}"
        cls = "s-" + e["state"].replace(" ", "-")
        rows.append(
            f'<tr data-enterprise="{_e(e["id"])}"><td>{_e(e["id"])}</td>'
            f'<td class="{cls}" data-field="state">{_e(e["state"])}</td>'
            f'<td class="n" data-field="head-index">{e["head_index"]}</td>'
            f'<td class="n" data-field="charged-rounds">{e["charged_rounds"]}</td>'
            f'<td class="n" data-field="epsilon" data-value="{eps!r}">{bound}{eps:.4f}</td>'
            f'<td><span class="bar{" over" if eps > target else ""}" style="width:{width:.0f}px">'
            f'</span> <span class="muted">of {target:g}</span></td>'
            f'<td class="n" data-field="contribution">{share}</td>'
            f'<td class="muted">{_e(e["note"])}</td></tr>')
    return "".join(rows)


def _history_rows(snap: dict[str, Any]) -> str:
    rows = []
    for h in snap["history"]:
        took = "-" if h["duration"] is None else f"{h['duration']:.1f} s"
        surv = "-" if h["survivors"] is None else f"{h['survivors']} of {h['participants']}"
        why = "" if not h["abort_reason"] else _e(h["abort_reason"])
        rows.append(
            f'<tr data-round="{h["round"]}"><td class="n">{h["round"]}</td>'
            f'<td data-field="mode">{_e(h["mode"])}</td>'
            f'<td class="st-{_e(h["status"])}" data-field="status">{_e(h["status"])}</td>'
            f'<td class="n" data-field="duration">{took}</td>'
            f'<td class="n" data-field="survivors" data-value="{h["survivors"]}">{surv}</td>'
            f'<td class="n" data-field="bytes-in" data-value="{h["bytes_in"]}">'
            f'{_bytes(h["bytes_in"])}</td>'
            f'<td class="n" data-field="bytes-out" data-value="{h["bytes_out"]}">'
            f'{_bytes(h["bytes_out"])}</td><td class="muted">{why}</td></tr>')
    return "".join(rows)


def render_page(board: StatusBoard) -> str:
    """The whole page, from one snapshot of ``board``."""
    snap = board.snapshot()
    finished = " &mdash; finished" if snap["finished"] else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="{REFRESH_S}">
<meta name="viewport" content="width=device-width,initial-scale=1">
<link rel="icon" href="data:,">
<title>secfed coordinator: {_e(snap['federation'])}</title><style>{_CSS}</style></head>
<body><h1>Federation <span data-field="federation">{_e(snap['federation'])}</span>{finished}</h1>
<p class="muted">Read-only view of this coordinator, refreshed every {REFRESH_S} s
(as of <span data-field="as-of">{_when(snap['now'])}</span>). Rounds done:
<b data-field="completed">{snap['completed']}</b>, aborted: <b data-field="aborted">
{snap['aborted']}</b>. Metrics: <a href="/metrics">/metrics</a>.</p>
<h2>Current round</h2>{_round_section(snap)}
<h2>Enterprises</h2>
<table id="enterprises"><thead><tr><th>enterprise</th><th>state this round</th>
<th>ledger head</th><th>charged rounds seen</th><th>&epsilon; (RDP)</th><th>vs target</th>
<th>contribution</th><th>note</th></tr></thead><tbody>{_enterprise_rows(snap)}</tbody></table>
<p class="muted">&epsilon; is composed by the coordinator from the public terms of each round whose
signed ledger head it accepted with an upload (&ge;: the site's ledger holds more entries than
that). Each site's own budget lives in its site.toml and is enforced there; the audit report
re-verifies its signed ledger.</p>
<h2>Round history</h2>
<table id="history"><thead><tr><th>round</th><th>mode</th><th>status</th><th>duration</th>
<th>survivors</th><th>bytes in</th><th>bytes out</th><th>abort reason</th></tr></thead>
<tbody>{_history_rows(snap)}</tbody></table>
</body></html>
"""
