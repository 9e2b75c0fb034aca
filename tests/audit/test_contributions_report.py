"""The audit report's contributions section (issue 17): per probed round the norm estimates,
exclusions, shares and scalars revealed; cumulative shares with participation; rounds without
probes said plainly; a transcript whose probe outcome contradicts its survivors fails."""

from __future__ import annotations

import json
import shutil
import sqlite3

import jsonschema
import pytest

from secfed.audit import build_report, load_schema
from secfed.audit.model import CheckStatus
from secfed.audit.page import render_html

from .federation_run import ENTERPRISES, FederationRun, run_federation

PROBES = 32


@pytest.fixture(scope="module")
def probed(tmp_path_factory) -> FederationRun:
    """A secagg round with 32 probes, then a ckks round (which carries none)."""
    return run_federation(tmp_path_factory.mktemp("probed"), modes=("secagg", "ckks"), probes=PROBES)


def _report(run: FederationRun, transcript=None):
    return build_report(ledgers=list(run.ledgers.values()), transcript=transcript or run.transcript,
                        federation=run.federation_toml)


def test_report_lists_shares_exclusions_and_revealed_scalars(probed) -> None:
    report = _report(probed)
    section = report.contributions
    assert section is not None
    (first,) = section["rounds"]
    assert (first["round"], first["mode"], first["status"], first["probes"]) == (1, "secagg", "done", PROBES)
    assert first["excluded"] == [] and set(first["survivors"]) == set(ENTERPRISES)
    assert set(first["norm_estimates"]) == set(ENTERPRISES)
    assert all(0.0 < v < first["exclusion_limit"] for v in first["norm_estimates"].values())
    assert set(first["shares"]) == set(ENTERPRISES)
    assert abs(sum(first["shares"].values()) - 1.0) < 1e-9
    # k + 1 scalars of each update: k probes, one contribution term
    assert first["revealed_scalars"] == {e: PROBES + 1 for e in ENTERPRISES}
    assert section["unprobed_rounds"] == [
        {"round": 2, "mode": "ckks", "reason": "ckks rounds carry no verified probes"}]
    for e in ENTERPRISES:
        row = section["cumulative"][e]
        assert (row["rounds"], row["in_sum"], row["excluded"], row["revealed_scalars"]) == (1, 1, 0, PROBES + 1)
        assert row["share"] == pytest.approx(first["shares"][e], abs=1e-12)
    shares = [section["cumulative"][e]["share"] for e in section["cumulative"]]
    assert shares == sorted(shares, reverse=True)  # ranked
    (check,) = [c for c in report.checks if c.name == "probe_outcomes"]
    assert check.status is CheckStatus.PASS and check.subject == "round 1"
    assert report.verdict == "pass", [c for c in report.failures]
    doc = report.to_json_dict()
    jsonschema.validate(doc, load_schema())
    html = render_html(report, plots={})
    assert 'id="contributions-round-1"' in html and 'id="contributions-cumulative"' in html
    assert "k + 1 scalars" in html and "ckks rounds carry no verified probes" in html
    for e in ENTERPRISES:
        assert f"{first['shares'][e]:.6f}" in html


def _tamper(run: FederationRun, tmp_path, edit) -> object:
    copy = tmp_path / "state.sqlite"
    shutil.copy(run.transcript, copy)
    db = sqlite3.connect(copy)
    (raw,) = db.execute("SELECT outcome FROM probe_outcomes WHERE round = 1").fetchone()
    outcome = json.loads(raw)
    edit(outcome)
    db.execute("UPDATE probe_outcomes SET outcome = ? WHERE round = 1", (json.dumps(outcome),))
    db.commit()
    db.close()
    return copy


def test_an_excluded_enterprise_among_the_survivors_fails_the_audit(probed, tmp_path) -> None:
    victim = ENTERPRISES[1]
    copy = _tamper(probed, tmp_path, lambda o: o.__setitem__("excluded", [victim]))
    report = _report(probed, copy)
    (check,) = [c for c in report.checks if c.name == "probe_outcomes"]
    assert check.status is CheckStatus.FAIL and victim in check.detail
    assert report.verdict == "fail"
    # the section still shows what the transcript claims, marked excluded
    assert report.contributions is not None
    assert report.contributions["rounds"][0]["excluded"] == [victim]
    assert "excluded (norm check)" in render_html(report, plots={})


def test_shares_that_do_not_sum_to_one_fail_the_audit(probed, tmp_path) -> None:
    def inflate(o: dict) -> None:
        o["contributions"][ENTERPRISES[0]] += 0.25

    report = _report(probed, _tamper(probed, tmp_path, inflate))
    (check,) = [c for c in report.checks if c.name == "probe_outcomes"]
    assert check.status is CheckStatus.FAIL and "sum to" in check.detail
    assert report.verdict == "fail"


def test_rounds_without_probes_reveal_nothing_beyond_the_sum(federation) -> None:
    report = _report(federation)
    section = report.contributions
    assert section is not None and section["rounds"] == [] and section["cumulative"] == {}
    assert [u["round"] for u in section["unprobed_rounds"]] == [1, 2, 3]
    assert not [c for c in report.checks if c.name == "probe_outcomes"]
    jsonschema.validate(report.to_json_dict(), load_schema())


def test_a_transcript_from_before_probes_has_no_contributions_section(federation, tmp_path) -> None:
    copy = tmp_path / "old.sqlite"
    shutil.copy(federation.transcript, copy)
    db = sqlite3.connect(copy)
    db.execute("DROP TABLE probe_outcomes")
    db.commit()
    db.close()
    report = _report(federation, copy)
    assert report.contributions is None
    jsonschema.validate(report.to_json_dict(), load_schema())
    assert "nothing beyond the sum was revealed" in render_html(report, plots={})
