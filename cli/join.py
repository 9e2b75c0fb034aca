"""``secfed join --kit DIR --model DIR --data DIR``: take part in a federation as one site."""

from __future__ import annotations

import json
from pathlib import Path

import click

from secfed.cli.options import json_option

_dir = click.Path(exists=True, file_okay=False, path_type=Path)


@click.command("join")
@click.option("--kit", "kit_dir", type=_dir, required=True, help="This enterprise's startup kit.")
@click.option("--model", "model_dir", type=_dir, default=None, help="Model directory.")
@click.option("--data", "data_dir", type=_dir, default=None, help="This site's dataset.")
@click.option("--test-data", "test_dir", type=_dir, default=None, help="Held-out set to report.")
@click.option("--synthetic", is_flag=True, hidden=True, help="Stand-in updates (tests, benches).")
@click.option("--synthetic-train-s", type=click.FloatRange(min=0), default=0.0, hidden=True,
              help="With --synthetic: seconds of CPU work standing in for local training.")
@click.option("--max-rounds", type=int, default=None)
@click.option("--new-ledger", is_flag=True, default=False,
              help="Start a NEW privacy ledger if the kit has none: only for a site that never "
              "took part (refused when its state shows past rounds).")
@json_option
def command(kit_dir: Path, model_dir: Path | None, data_dir: Path | None, test_dir: Path | None,
            synthetic: bool, synthetic_train_s: float, max_rounds: int | None, new_ledger: bool,
            as_json: bool) -> None:
    """Fetch, check, train with DP, charge the ledger, protect, upload, apply -- every round.

    With the federation's [dp.distributed] table this site also clips its whole update and adds
    its Skellam noise share before masking, if its site.toml accepts it (accept_distributed_dp,
    min_noise_shares); the ledger then gets a second entry per round before the upload, counting
    the shares its assumed_colluders (default 1) do not know.

    A round the coordinator announces differently from this kit's federation.toml (mode of the
    schedule, roster, k, threshold, clip, ring, scale, DP terms) is refused before any secret.
    """
    from secfed.participant import run_participant

    def show(event: dict) -> None:
        if event["event"] == "ledger_created":  # loud, whatever the output format
            click.echo(f"[{event['enterprise']}] WARNING: {event['warning']} at {event['path']}",
                       err=True)
        if as_json:
            click.echo(json.dumps(event, sort_keys=True, default=str))
        elif event["event"] in ("round_report", "round_refused", "round_aborted", "charged",
                                "training", "peers_disagree", "distributed_dp"):
            rest = {k: v for k, v in event.items() if k not in ("event", "at", "enterprise")}
            click.echo(f"[{event['enterprise']}] {event['event']}: {rest}")

    run_participant(kit_dir, model_dir=model_dir, data_dir=data_dir, test_dir=test_dir,
                    synthetic=synthetic, synthetic_train_s=synthetic_train_s,
                    events=show, max_rounds=max_rounds, new_ledger=new_ledger)
