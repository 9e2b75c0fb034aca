"""Write a report to a directory: ``report.json``, ``report.html`` and the PNG plots."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from secfed.audit.model import AuditReport
from secfed.audit.page import render_html
from secfed.audit.plots import epsilon_plot, participants_plot
from secfed.errors import AuditError

__all__ = ["write_report", "PLOT_FILES"]

PLOT_FILES = {"epsilon": "epsilon_over_rounds.png", "participants": "participants_per_round.png"}


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_report(report: AuditReport, out_dir: str | Path) -> dict[str, Path]:
    """Render and write the report; returns what was written by kind (json, html, plot names).

    Raises:
        AuditError: ``out_dir`` exists and is not a directory, or cannot be created.
    """
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AuditError(f"--out must be a writable directory (got {str(out)!r}: {exc})") from exc
    plots = {"epsilon": epsilon_plot(report), "participants": participants_plot(report)}
    report = dataclasses.replace(report, plots=dict(PLOT_FILES))
    written: dict[str, Path] = {}
    for name, png in plots.items():
        written[name] = out / PLOT_FILES[name]
        _write_atomic(written[name], png)
    written["json"] = out / "report.json"
    _write_atomic(written["json"], (report.to_json() + "\n").encode("utf-8"))
    written["html"] = out / "report.html"
    _write_atomic(written["html"], render_html(report, plots=plots).encode("utf-8"))
    return written
