"""``secfed audit``: re-verify privacy ledgers and write the audit report (HTML + JSON + PNG)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from secfed.cli.options import emit_json, json_option

if TYPE_CHECKING:
    from secfed.audit import AuditReport

_file = click.Path(exists=True, dir_okay=False, path_type=Path)


@click.command(name="audit")
@click.option(
    "--ledger",
    "ledgers",
    type=_file,
    multiple=True,
    required=True,
    help="An enterprise's ledger.sqlite (repeat for each enterprise).",
)
@click.option("--transcript", type=_file, default=None, help="The coordinator's state.sqlite.")
@click.option(
    "--federation",
    type=_file,
    default=None,
    help="federation.toml: pinned identities and settings (without it nothing is pinned).",
)
@click.option(
    "--outbound",
    "outbound",
    multiple=True,
    metavar="[ENTERPRISE=]DB",
    help="A participant's state.sqlite (outbound log); ENTERPRISE= when it is not beside the ledger.",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Directory for report.html, report.json and the PNG plots.",
)
@json_option
def command(
    ledgers: tuple[Path, ...],
    transcript: Path | None,
    federation: Path | None,
    outbound: tuple[str, ...],
    out_dir: Path,
    as_json: bool,
) -> None:
    """Re-verify ledgers (hash chain, signatures, ε, transcript heads) and write the report.

    Exits 1 when any check fails; the report names the failing entry and why.
    """
    from secfed.audit import build_report, write_report

    outbound_dbs: list[tuple[str | None, Path]] = []
    for item in outbound:
        name, sep, db = item.rpartition("=")
        path = Path(db if sep else item)
        if not path.is_file():
            raise click.BadParameter(
                f"must be an existing file (got {str(path)!r})", param_hint="--outbound"
            )
        outbound_dbs.append((name or None, path))

    report = build_report(
        ledgers=list(ledgers),
        transcript=transcript,
        federation=federation,
        outbound=outbound_dbs,
    )
    written = write_report(report, out_dir)
    if as_json:
        emit_json(report.to_json_dict())
    else:
        _print_summary(report, written)
    for check in report.failures:
        where = f" entry {check.entry}" if check.entry is not None else ""
        click.echo(f"FAIL {check.subject} {check.name}{where}: {check.detail}", err=True)
    if report.failures:
        raise SystemExit(1)


def _print_summary(report: AuditReport, written: dict[str, Path]) -> None:
    for ent in report.enterprises:
        click.echo(
            f"{ent.enterprise_id}: ε={_eps(ent.epsilon_prv)} (PRV) {_eps(ent.epsilon_rdp)} (RDP) "
            f"of budget {ent.budget_epsilon:g}, δ={ent.delta:.3g}, {len(ent.rounds)} rounds, "
            f"{'—' if ent.outlook.rounds_remaining is None else ent.outlook.rounds_remaining} "
            "more rounds allowed"
        )
    click.echo(
        f"verdict: {report.verdict.upper()} ({len(report.failures)} of {len(report.checks)} checks failed)"
    )
    for kind, path in written.items():
        click.echo(f"wrote {kind}: {path}")


def _eps(value: float | None) -> str:
    return "unreadable" if value is None else f"{value:.4f}"
