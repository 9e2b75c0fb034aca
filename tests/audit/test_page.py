"""Rendering properties of the report page, the plots and the JSON form, on a hand-built report."""

from __future__ import annotations

import base64
import json
import struct
from html.parser import HTMLParser

import jsonschema
import pytest

from secfed.audit.model import (
    SCHEMA_VERSION,
    AuditReport,
    BudgetOutlook,
    Check,
    CheckStatus,
    EnterpriseReport,
    EntryRecord,
    load_schema,
)
from secfed.audit.page import render_html
from secfed.audit.writer import write_report

HOSTILE_ID = '<script>alert("x")</script>&"'


def _report(*, fail: bool = False, enterprise_id: str = "energy-utility") -> AuditReport:
    entries = tuple(
        EntryRecord(
            index=i,
            round_number=i + 1,
            session_id="ab" * 32,
            mechanism={"kind": "dpsgd", "noise_multiplier": 1.1, "sample_rate": 0.02, "steps": 40},
            recorded_epsilon_prv=0.4 * (i + 1),
            recorded_epsilon_rdp=0.5 * (i + 1),
            recomputed_epsilon_prv=0.4 * (i + 1),
            recomputed_epsilon_rdp=0.5 * (i + 1),
            entry_hash="cd" * 32,
        )
        for i in range(3)
    )
    ent = EnterpriseReport(
        enterprise_id=enterprise_id,
        ledger_path="/kits/e/ledger.sqlite",
        identity_public_key="ef" * 32,
        identity_pinned=True,
        budget_epsilon=8.0,
        delta=1e-5,
        epsilon_prv=1.2,
        epsilon_rdp=1.5,
        recorded_epsilon_prv=1.2,
        recorded_epsilon_rdp=1.5,
        rounds=(1, 2, 3),
        entries=entries,
        outlook=BudgetOutlook(6.8, 12, "rdp", 1.1, 0.02, 40),
        head_hash="cd" * 32,
    )
    checks = [Check("ledger_integrity", enterprise_id, CheckStatus.PASS, "chain and signatures")]
    if fail:
        checks.append(
            Check(
                "epsilon_recomputed",
                enterprise_id,
                CheckStatus.FAIL,
                "entry 2: recorded ε 1.3 but events give 1.2",
                entry=2,
                round_number=3,
            )
        )
    return AuditReport(
        generated_at="2026-11-26T02:00:00+00:00",
        secfed_version="0.1.0",
        inputs={
            "ledgers": ["/kits/e/ledger.sqlite"],
            "transcript": None,
            "federation": None,
            "outbound": [],
        },
        enterprises=(ent,),
        federation=None,
        assumptions=(),
        checks=tuple(checks),
    )


class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def _png_size(png: bytes) -> tuple[int, int]:
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    return struct.unpack(">II", png[16:24])


def test_written_report_is_self_contained_and_valid(tmp_path):
    report = _report()
    written = write_report(report, tmp_path / "out")
    assert {p.name for p in (tmp_path / "out").iterdir()} == {
        "report.html",
        "report.json",
        "epsilon_over_rounds.png",
        "participants_per_round.png",
    }
    doc = json.loads(written["json"].read_text())
    jsonschema.validate(doc, load_schema(), format_checker=jsonschema.FormatChecker())
    assert doc["schema_version"] == SCHEMA_VERSION and doc["verdict"] == "pass"
    assert doc["plots"] == {
        "epsilon": "epsilon_over_rounds.png",
        "participants": "participants_per_round.png",
    }

    page = _Collector()
    page.feed(written["html"].read_text())
    names = [t for t, _ in page.tags]
    assert "script" not in names and "link" not in names and "iframe" not in names
    for _, attrs in page.tags:
        for key in ("src", "href"):
            value = attrs.get(key)
            assert value is None or value.startswith("data:image/png;base64,"), value
    images = [attrs["src"] for tag, attrs in page.tags if tag == "img"]
    assert len(images) == 2
    for src, kind in zip(images, ("epsilon", "participants")):
        png = base64.b64decode(src.split(",", 1)[1])
        assert png == written[kind].read_bytes()
        width, height = _png_size(png)
        assert width > 200 and height > 100


def test_epsilon_table_shows_the_report_numbers():
    report = _report()
    html = render_html(report, plots={})
    table = html[html.index('id="epsilon-table"') :]
    table = table[: table.index("</table>")]
    ent = report.enterprises[0]
    for value in (
        f"{ent.epsilon_prv:.4f}",
        f"{ent.epsilon_rdp:.4f}",
        f"{ent.outlook.remaining_epsilon:.4f}",
        str(ent.outlook.rounds_remaining),
    ):
        assert f">{value}<" in table


def test_failures_are_named_on_the_page_and_in_json():
    report = _report(fail=True)
    assert report.verdict == "fail"
    html = render_html(report, plots={})
    assert "Verdict: FAIL" in html and "(entry 2)" in html and "epsilon_recomputed" in html
    doc = report.to_json_dict()
    jsonschema.validate(doc, load_schema())
    failed = [c for c in doc["checks"] if c["status"] == "fail"]
    assert failed == [
        {
            "name": "epsilon_recomputed",
            "subject": "energy-utility",
            "status": "fail",
            "detail": "entry 2: recorded ε 1.3 but events give 1.2",
            "entry": 2,
            "round_number": 3,
        }
    ]


def test_recorded_strings_are_escaped():
    html = render_html(_report(enterprise_id=HOSTILE_ID), plots={})
    page = _Collector()
    page.feed(html)
    assert "script" not in [t for t, _ in page.tags]
    assert HOSTILE_ID in "".join(page.text)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.pop("schema_version"),
        lambda d: d.__setitem__("schema_version", SCHEMA_VERSION + 1),
        lambda d: d["enterprises"][0].__setitem__("epsilon_prv", -1.0),
        lambda d: d["checks"][0].__setitem__("status", "ok"),
        lambda d: d["enterprises"][0].__setitem__("identity_public_key", "xyz"),
        lambda d: d.__setitem__("plots", {"epsilon": "../../etc/passwd"}),
    ],
)
def test_schema_rejects_malformed_reports(mutate):
    doc = _report().to_json_dict()
    jsonschema.validate(doc, load_schema())
    mutate(doc)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, load_schema())


# --- issue 22 item 8: what the ε plot shows, where legends sit, what the tables hide or fold ---

def _two_equal_enterprises() -> AuditReport:
    """Two enterprises whose ε curves are identical (the case where one line hid the other)."""
    import dataclasses

    base = _report()
    twin = dataclasses.replace(base.enterprises[0], enterprise_id="city-operations")
    return dataclasses.replace(base, enterprises=(base.enterprises[0], twin))


def test_epsilon_plot_draws_gated_rdp_against_the_budget_and_reported_prv_per_enterprise():
    from secfed.audit.plots import BUDGET_LABEL, GATED_LABEL, REPORTED_LABEL, epsilon_figure

    report = _two_equal_enterprises()
    fig = epsilon_figure(report)
    panels = [ax for ax in fig.axes if ax.get_visible()]
    # equal curves stay apart: one panel per enterprise, named in its title
    assert len(panels) == len(report.enterprises) == 2
    for ax, ent in zip(panels, report.enterprises, strict=True):
        assert ax.get_title().startswith(ent.enterprise_id)
        lines = {line.get_label(): line for line in ax.get_lines()}
        assert set(lines) == {GATED_LABEL, REPORTED_LABEL, BUDGET_LABEL}
        assert list(lines[GATED_LABEL].get_ydata()) == [e.recomputed_epsilon_rdp for e in ent.entries]
        assert list(lines[REPORTED_LABEL].get_ydata()) == [e.recomputed_epsilon_prv for e in ent.entries]
        assert set(lines[BUDGET_LABEL].get_ydata()) == {ent.budget_epsilon}
        # both curves are told apart without colour too
        assert lines[GATED_LABEL].get_linestyle() != lines[REPORTED_LABEL].get_linestyle()
    assert "RDP" in GATED_LABEL and "budget" in GATED_LABEL and "PRV" in REPORTED_LABEL
    assert fig.get_supylabel() == "ε after the round"  # not "ε spent (δ per enterprise)"
    import matplotlib.pyplot as plt

    plt.close(fig)


def _legend_boxes(fig):
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend()]
    assert legends, "the plot must have a legend"
    return [leg.get_window_extent(renderer) for leg in legends], renderer


@pytest.mark.parametrize("which", ["epsilon", "participants"])
def test_no_legend_over_the_plotting_area(which):
    import matplotlib.pyplot as plt

    from secfed.audit.plots import epsilon_figure, participants_figure

    make = epsilon_figure if which == "epsilon" else participants_figure
    fig = make(_two_equal_enterprises())
    boxes, _ = _legend_boxes(fig)
    areas = [ax.get_window_extent() for ax in fig.axes if ax.get_visible()]
    for box in boxes:
        for area in areas:  # not even touching the area where bars and curves are drawn
            overlap_w = min(box.x1, area.x1) - max(box.x0, area.x0)
            overlap_h = min(box.y1, area.y1) - max(box.y0, area.y0)
            assert overlap_w <= 0 or overlap_h <= 1, (which, box, area)
    plt.close(fig)


def _headers(html: str, table_id: str) -> list[str]:
    table = html.split(f'id="{table_id}"', 1)[1].split("</thead>", 1)[0]
    return [h.split("</th>", 1)[0] for h in table.split("<th>")[1:]]


def test_checks_table_drops_columns_no_check_fills():
    html = render_html(_report(), plots={})
    assert _headers(html, "checks-table") == ["verdict", "check", "subject", "detail"]
    failing = render_html(_report(fail=True), plots={})
    assert _headers(failing, "checks-table") == ["verdict", "check", "subject", "entry", "round",
                                                 "detail"]
    row = failing.split('id="checks-table"', 1)[1].split("<tr>")[2]  # the failing check first
    assert '<td class="num">2</td><td class="num">3</td>' in row


@pytest.mark.parametrize("count", [3, 105])
def test_long_outbound_logs_fold_short_ones_stay_open(count):
    import dataclasses

    from secfed.audit.model import OutboundLog, OutboundMessage
    from secfed.audit.page import OUTBOUND_SHOWN

    messages = tuple(OutboundMessage(1 + i // 5, "upload", "coordinator", 100 + i, "masked",
                                     f"{i:064x}") for i in range(count))
    log = OutboundLog(source="/kits/e/state.sqlite", messages=messages, by_protection={"masked": count})
    base = _report()
    report = dataclasses.replace(
        base, enterprises=(dataclasses.replace(base.enterprises[0], outbound=log),))
    html = render_html(report, plots={})
    section = html.split('<section class="enterprise"', 1)[1].split("</section>", 1)[0]
    assert section.count("<td>upload</td>") == count  # every message is on the page
    folded = "<details" in section
    assert folded == (count > OUTBOUND_SHOWN)
    if folded:
        details = section.split("<details", 1)[1].split("</details>", 1)[0]
        assert f"{count} messages (masked: {count})" in details.split("</summary>", 1)[0]
        assert details.count("<td>upload</td>") == count
