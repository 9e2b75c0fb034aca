"""``secfed aggregate --kit DIR``: run the coordinator of a federation."""

from __future__ import annotations

import json
from pathlib import Path

import click

from secfed.cli.options import json_option


def _printer(as_json: bool):
    if as_json:
        return lambda event: click.echo(json.dumps(event, sort_keys=True, default=str), nl=True)
    from rich.console import Console

    console = Console(stderr=False, highlight=False)

    def show(event: dict) -> None:
        kind = event["event"]
        if kind == "message":
            console.print(f"  [dim]r{event['round']} {event['stage']:<11} <- {event['sender']}"
                          f" ({event['bytes']} B)[/dim]")
        elif kind == "stage_closed":
            miss = f", missing {event['missing']}" if event["missing"] else ""
            console.print(f"  r{event['round']} stage [bold]{event['stage']}[/bold] closed: "
                          f"{event['received']} received{miss} -> {event['next']}")
        elif kind == "round_opened":
            console.print(f"[bold cyan]round {event['round']}[/bold cyan] opened: {event['mode']}, "
                          f"{len(event['participants'])} participants, t={event['threshold']}")
        elif kind == "round_aborted":
            console.print(f"[bold red]round {event['round']} aborted[/bold red]: {event['reason']}")
        elif kind == "round_done":
            console.print(f"[bold green]round {event['round']} done[/bold green]: global hash "
                          f"{(event['global_hash'] or '-')[:16]}, confirmed by {event['confirmed']}")
        else:
            console.print(f"{kind}: " + ", ".join(f"{k}={v}" for k, v in event.items()
                                                  if k not in ("event", "at")))

    return show


@click.command("aggregate")
@click.option("--kit", "kit_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              required=True, help="The coordinator's startup kit.")
@click.option("--fsync/--no-fsync", "durable", default=False, show_default=True,
              help="fsync every state commit (survives power loss; by default commits survive "
                   "the coordinator process being killed, without an fsync per message).")
@json_option
def command(kit_dir: Path, durable: bool, as_json: bool) -> None:
    """Serve the coordinator API (mutual TLS) and drive every round of the federation."""
    from secfed.coordinator import run_coordinator

    run_coordinator(kit_dir, events=_printer(as_json), durable=durable)
