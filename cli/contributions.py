"""``secfed contributions``: verified contribution shares and norm-check exclusions per round."""

from __future__ import annotations

import click

from secfed.cli.options import emit_json, json_option


@click.command("contributions")
@click.option("--transcript", "transcript", required=True, type=click.Path(dir_okay=False),
              help="The coordinator's state database (its transcript).")
@json_option
def command(transcript: str, as_json: bool) -> None:
    """Per round: norm estimates, exclusions, shares <u_i, U>/<U, U>; then each enterprise's
    cumulative share (mean over the probed rounds it was asked to, 0 when absent or excluded)."""
    from secfed.audit.contributions import read_contributions

    ledger = read_contributions(transcript)
    if as_json:
        emit_json(ledger.to_dict())
        return
    if not ledger.rounds:
        click.echo("no probed round in this transcript")
        return
    for r in ledger.rounds:
        click.echo(f"round {r.round_number} ({r.mode}, {r.status}): k={r.probes}, exclusion above "
                   f"{r.limit:.6g}; excluded: {', '.join(r.excluded) or 'none'}")
        for p in r.participants:
            est = r.norm_estimates.get(p)
            share = r.shares.get(p)
            shown = ("excluded" if p in r.excluded else f"share {share:.6f}" if share is not None
                     else "no share")
            norm = f"norm ~{est:.4g}" if est is not None else "not probed"
            click.echo(f"  {p:<28} {norm:<18} {shown}")
    click.echo("cumulative (done rounds):")
    for p, row in ledger.cumulative.items():
        click.echo(f"  {p:<28} share {row['share']:.6f}  in sum {row['in_sum']}/{row['rounds']}"
                   f"  excluded {row['excluded']}")
