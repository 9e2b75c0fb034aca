"""``secfed aggregate --kit DIR``: run the coordinator of a federation."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from secfed.cli.logs import json_log_sink, log_format_option
from secfed.cli.options import json_option
from secfed.transport.status_http import DEFAULT_STATUS_LISTEN


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
        elif kind == "status_listening":
            console.print(f"status page: {event['url']}  metrics: {event['metrics']}")
        elif kind == "serving_until_stopped":
            console.print("the federation finished; still serving the status page and the API "
                          "(--keep-serving): Ctrl-C or SIGTERM stops")
        elif kind == "warning":
            console.print(f"[bold yellow]warning[/bold yellow]: {event['warning']}")
        elif kind in ("ledger_head", "confirmed", "message_refused", "coordinator_stopped"):
            if kind == "message_refused":
                console.print(f"  [dim]r{event['round']} {event['stage']:<11} refused from "
                              f"{event['sender']}: {event['kind']} ({event['error']})[/dim]")
        elif kind == "site_refused":
            console.print(f"  [yellow]r{event['round']} {event['enterprise']} refused the round "
                          f"({event['kind']})[/yellow]: {event['reason']}")
        elif kind == "awaiting_sites":
            console.print(f"waiting for {len(event['roster'])} sites to report ready (round 1 "
                          f"opens when all are, at the latest in "
                          f"{max(0.0, event['deadline'] - event['at']):.0f} s)")
        elif kind == "site_ready":
            console.print(f"  {event['enterprise']} ready")
        elif kind == "sites_ready":
            missing = f"; not ready: {', '.join(event['missing'])}" if event["missing"] else ""
            console.print(f"opening round 1: {event['reason']}{missing}")
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
@click.option("--status-listen", default=DEFAULT_STATUS_LISTEN, show_default=True,
              metavar="HOST:PORT|off",
              help="Serve the read-only status page (/) and Prometheus metrics (/metrics) over "
                   "plain HTTP here; port 0 picks a free one (announced at start); 'off' serves "
                   "none. A non-loopback host also needs --status-public.")
@click.option("--status-public", is_flag=True, default=False,
              help="Allow --status-listen on a non-loopback address (unauthenticated HTTP: put "
                   "it behind your own access control).")
@click.option("--keep-serving", is_flag=True, default=False,
              help="After the federation's last round, keep serving the status page and the "
                   "API (outcomes, aggregates) until stopped with SIGTERM or Ctrl-C.")
@log_format_option
@json_option
def command(kit_dir: Path, durable: bool, status_listen: str, status_public: bool,
            keep_serving: bool, log_format: str, as_json: bool) -> None:
    """Serve the coordinator API (mutual TLS) and drive every round of the federation.

    Stops cleanly on SIGTERM or Ctrl-C (state committed; run the same command to resume).
    """
    from secfed.coordinator import run_coordinator

    sinks = []
    if log_format == "json":
        sinks.append(json_log_sink("coordinator"))
        from secfed import progress

        progress.configure("off")  # stderr carries only the JSON events
    if as_json or log_format == "text":
        sinks.append(_printer(as_json))

    def events(event: dict) -> None:
        for sink in sinks:
            sink(event)

    listen = None if status_listen.strip().lower() in ("off", "none", "") else status_listen
    stopped = run_coordinator(kit_dir, events=events, durable=durable, status_listen=listen,
                              status_public=status_public, keep_serving=keep_serving)
    if stopped:
        what = "interrupted" if stopped == "SIGINT" else f"stopped by {stopped}"
        click.echo(f"secfed: {what} (state saved; run the same command to resume)", err=True)
        # The servers are down, the state file closed and the lock released: skip the seconds
        # of interpreter teardown (torch) so a supervisor sees the process end promptly.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130 if stopped == "SIGINT" else 0)
