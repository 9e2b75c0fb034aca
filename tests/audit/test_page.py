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
