"""``secfed flower``: secfed's rounds on Flower's engines (needs ``secfed[flower]``)."""

from __future__ import annotations

import sys
from typing import Any

import click

from secfed.cli.options import emit_json, json_option
from secfed.names import MODES


@click.group("flower")
def command() -> None:
    """Run secfed's secure aggregation over Flower (simulation engine)."""


def _require_flower() -> None:
    from secfed.errors import ConfigError

    try:
        import flwr  # noqa: F401
        import ray  # noqa: F401
    except ImportError as exc:
        raise ConfigError(
            f"secfed flower needs the flower extra (pip install 'secfed[flower]'): {exc.name} "
            "is missing") from None


@command.command("simulate")
@click.option("--enterprises", "-n", type=click.IntRange(2, 5000), default=10, show_default=True,
              help="Number of simulated enterprises (Flower virtual nodes).")
@click.option("--dim", "-d", type=click.IntRange(1, 50_000_000), default=100_000, show_default=True,
              help="Length of each synthetic update vector.")
@click.option("--mode", "-m", type=click.Choice(MODES), default="secagg+",
              show_default=True, help="Secure aggregation mode of every round.")
@click.option("--rounds", "-r", type=click.IntRange(1, 1000), default=1, show_default=True,
              help="Number of rounds to run.")
@click.option("--drop", type=click.FloatRange(0.0, 1.0, max_open=True), default=0.0,
              show_default=True, help="Fraction of the sites that vanish right after uploading.")
@click.option("--workdir", type=click.Path(file_okay=False), default=None,
              help="Keep the kits, ledgers and coordinator transcript here (default: a temp dir).")
@json_option
def simulate(enterprises: int, dim: int, mode: str, rounds: int, drop: float,
             workdir: str | None, as_json: bool) -> None:
    """Synthetic sites on Flower's simulation engine: time per round, coordinator CPU, bytes per
    enterprise and the error of the unmasked sum against the survivors' plaintext sum."""
    _require_flower()
    from secfed.flower.simulate import simulate as run

    result: dict[str, Any] = run(enterprises=enterprises, dim=dim, mode=mode, rounds=rounds,
                                 drop=drop, workdir=workdir)
    if as_json:
        emit_json(result)
        return
    out = sys.stdout
    out.write(f"{result['enterprises']} enterprises, d={dim}, {mode}, {rounds} round(s), "
              f"{result['dropped']} dropped after upload\n")
    out.write(f"  round time (s)      {', '.join(f'{s:.2f}' for s in result['round_s'])}\n")
    out.write(f"  coordinator CPU (s) {result['coordinator_cpu_s']:.2f}\n")
    out.write(f"  bytes / enterprise  {result['bytes_per_enterprise']:,} per round\n")
    out.write(f"  survivors           {result['survivors']}\n")
    out.write(f"  max |sum - plain|   {result['max_abs_error']:.3g}\n")


@command.command("site")
@click.option("--kit", "kit_dir", type=click.Path(exists=True, file_okay=False), required=True,
              help="This enterprise's startup kit.")
@click.option("--new-ledger", is_flag=True, default=False,
              help="Start a NEW privacy ledger if the kit has none (a site that never took part).")
def site(kit_dir: str, new_ledger: bool) -> None:
    """Serve this site's participant to its SuperNode's ClientApp (deployment engine).

    Start it beside ``flower-supernode --node-config 'kit="KIT"'``: the ClientApp relays each
    Flower message to this process over KIT/flower-agent.sock (owner-only), where the round's
    secrets, the ledger and the site policy live. Synthetic updates (a stand-in model)."""
    _require_flower()
    from secfed.flower.agent import serve

    click.echo(f"secfed flower site: serving {kit_dir}", err=True)
    serve(kit_dir, new_ledger=new_ledger)
