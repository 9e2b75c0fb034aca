"""``secfed join --kit DIR --model DIR --data DIR``: take part in a federation as one site."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from secfed.cli.logs import json_log_for, run_options
from secfed.cli.options import EXISTING_DIR


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list | tuple):
        return ", ".join(_value(x) for x in v) or "none"
    return str(v)


def describe(event: dict[str, Any]) -> str | None:
    """One line of plain words for the events a person follows (None: not shown).

    Numbers are rounded and lists joined; no Python dict or list is ever printed as such.
    """
    kind, r = event["event"], event.get("round")
    if kind == "training":
        return f"round {r} ({event.get('mode')}): training with DP-SGD"
    if kind == "charged":
        return f"round {r}: ledger charged before the update leaves, epsilon now " \
               f"{_value(event.get('epsilon'))}"
    if kind == "round_report":
        if event.get("status") in ("refused", "aborted"):
            return None  # its round_refused / round_aborted line said why
        metrics = event.get("metrics") or {}
        parts = [f"epsilon {_value(event['epsilon'])}" if event.get("epsilon") is not None
                 else None, *(f"{k} {_value(v)}" for k, v in sorted(metrics.items()))]
        said = "; ".join(p for p in parts if p)
        detail = str(event.get("detail") or "")
        if detail and not detail.startswith("{"):  # a done round's detail is JSON facts
            said = f"{said}; {detail}" if said else detail
        survivors = event.get("survivors") or []
        who = f", {len(survivors)} survivors" if survivors else ""
        return f"round {r} {event.get('status')} ({event.get('mode')}{who})" + \
            (f": {said}" if said else "")
    if kind in ("round_refused", "round_aborted", "peers_disagree"):
        verb = {"round_refused": "refused", "round_aborted": "aborted",
                "peers_disagree": "peers disagree"}[kind]
        return f"round {r} {verb}: {event.get('reason')}"
    if kind == "federation_finished":
        return f"the federation finished (last round seen: {r}); stopping"
    if kind == "rolled_back":
        return f"round {r} rolled back: the coordinator aborted it after this site applied " \
               f"its sum ({event.get('reason')}); back to global hash " \
               f"{str(event.get('global_hash'))[:12]}..."
    if kind == "distributed_dp":
        rest = {k: v for k, v in event.items() if k not in ("event", "at", "enterprise", "round")}
        return f"round {r}: distributed DP " + ", ".join(
            f"{k.replace('_', ' ')} {_value(v)}" for k, v in sorted(rest.items()))
    return None


@click.command("join")
@run_options("This enterprise's startup kit.")
@click.option("--model", "model_dir", type=EXISTING_DIR, default=None, help="Model directory.")
@click.option("--data", "data_dir", type=EXISTING_DIR, default=None, help="This site's dataset.")
@click.option("--test-data", "test_dir", type=EXISTING_DIR, default=None,
              help="Held-out set to report.")
@click.option("--synthetic", is_flag=True, hidden=True, help="Stand-in updates (tests, benches).")
@click.option("--synthetic-train-s", type=click.FloatRange(min=0), default=0.0, hidden=True,
              help="With --synthetic: seconds of CPU work standing in for local training.")
@click.option("--max-rounds", type=click.IntRange(min=1), default=None,
              help="Stop after taking part in this many rounds (default: until the "
                   "federation's last round).")
@click.option("--new-ledger", is_flag=True, default=False,
              help="Start a NEW privacy ledger if the kit has none: only for a site that never "
              "took part (refused when its state shows past rounds).")
def command(kit_dir: Path, model_dir: Path | None, data_dir: Path | None, test_dir: Path | None,
            synthetic: bool, synthetic_train_s: float, max_rounds: int | None, new_ledger: bool,
            log_format: str, as_json: bool) -> None:
    """Fetch, check, train with DP, charge the ledger, protect, upload, apply -- every round.

    With the federation's [dp.distributed] table this site also clips its whole update and adds
    its Skellam noise share before masking, if its site.toml accepts it (accept_distributed_dp,
    min_noise_shares); the ledger then gets a second entry per round before the upload, counting
    the shares its assumed_colluders (default 1) do not know.

    A round the coordinator announces differently from this kit's federation.toml (mode of the
    schedule, roster, k, threshold, clip, ring, scale, DP terms) is refused before any secret.
    """
    from secfed.participant import run_participant
    from secfed.transport.client import check_client_certificate

    if (kit_dir / "client.pem").is_file():  # an expired certificate: refused before any state
        check_client_certificate(kit_dir / "client.pem")

    log = json_log_for(log_format, "participant")

    def show(event: dict) -> None:
        if log is not None:  # the JSON log on stderr replaces the text lines
            log(event)
            if as_json:
                click.echo(json.dumps(event, sort_keys=True, default=str))
            return
        if event["event"] == "ledger_created":  # loud, whatever the output format
            click.echo(f"[{event['enterprise']}] WARNING: {event['warning']} at {event['path']}",
                       err=True)
        if as_json:
            click.echo(json.dumps(event, sort_keys=True, default=str))
            return
        line = describe(event)
        if line is not None:
            click.echo(f"[{event['enterprise']}] {line}")

    run_participant(kit_dir, model_dir=model_dir, data_dir=data_dir, test_dir=test_dir,
                    synthetic=synthetic, synthetic_train_s=synthetic_train_s,
                    events=show, max_rounds=max_rounds, new_ledger=new_ledger)
