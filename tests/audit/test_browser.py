"""The report opens in headless Debian Chromium: no console errors, no network, the ε table and
both plots rendered with non-zero size. Marked slow: installing chromium takes minutes
(``make test-slow`` runs ``make browser`` first; the harness installs it if still missing)."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest

from secfed.audit import write_report

from .chromium import visit
from .tamper import flip_byte
from .test_report import full_report
from .test_tamper import VICTIM

PROBE = """(() => {
  const table = document.getElementById('epsilon-table');
  const rows = table ? [...table.tBodies[0].rows].map(r => [...r.cells].map(c => c.textContent))
                     : [];
  const imgs = [...document.images].map(i => ({id: i.id, complete: i.complete,
      w: i.naturalWidth, h: i.naturalHeight, shownW: i.getBoundingClientRect().width,
      shownH: i.getBoundingClientRect().height}));
  return {title: document.title, rows, imgs,
          verdict: document.getElementById('verdict').textContent,
          scripts: document.scripts.length};
})()"""


def _png_size(png: bytes) -> tuple[int, int]:
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", png[16:24])


def _keep(shot: bytes, tmp_path: Path, name: str) -> Path:
    out = Path(os.environ.get("SECFED_SCREENSHOT_DIR", tmp_path))
    out.mkdir(parents=True, exist_ok=True)
    (out / name).write_bytes(shot)
    return out / name


@pytest.mark.slow
@pytest.mark.browser
def test_report_renders_in_headless_chromium(federation, tmp_path):
    report = full_report(federation)
    written = write_report(report, tmp_path / "report")
    seen = visit(written["html"], PROBE)
    assert seen.loaded
    assert seen.console_errors == []
    assert all(u.startswith(("file:", "data:")) for u in seen.requests), seen.requests
    probe = seen.probe
    assert probe["title"] == "secfed privacy budget audit" and probe["scripts"] == 0
    assert "PASS" in probe["verdict"]
    # the ε table: one row per enterprise with the recomputed figures
    rows = {r[0]: r for r in probe["rows"]}
    assert set(rows) == {e.enterprise_id for e in report.enterprises}
    for ent in report.enterprises:
        assert rows[ent.enterprise_id][2] == f"{ent.epsilon_prv:.4f}"
        assert rows[ent.enterprise_id][3] == f"{ent.epsilon_rdp:.4f}"
        assert rows[ent.enterprise_id][-1] == "PASS"
    # both plots decoded and laid out with non-zero size
    imgs = {i["id"]: i for i in probe["imgs"]}
    assert set(imgs) == {"plot-epsilon", "plot-participants"}
    for img in imgs.values():
        assert img["complete"] and img["w"] > 0 and img["h"] > 0, img
        assert img["shownW"] > 100 and img["shownH"] > 50, img
    width, height = _png_size(seen.screenshot)
    assert width >= 1000 and height > 1500  # the full page, not an empty viewport
    _keep(seen.screenshot, tmp_path, "report-pass.png")
    json.loads(written["json"].read_text())


@pytest.mark.slow
@pytest.mark.browser
def test_failed_report_renders_the_failing_entry(federation, tmp_path):
    assert flip_byte(federation.ledgers[VICTIM], 2, "eps_rdp", 5)
    report = full_report(federation)
    assert report.verdict == "fail"
    written = write_report(report, tmp_path / "report")
    seen = visit(written["html"], PROBE)
    assert seen.loaded and seen.console_errors == []
    assert "FAIL" in seen.probe["verdict"]
    rows = {r[0]: r for r in seen.probe["rows"]}
    assert rows[VICTIM][-1] == "FAIL"
    assert {r[-1] for k, r in rows.items() if k != VICTIM} == {"PASS"}
    _keep(seen.screenshot, tmp_path, "report-fail.png")
