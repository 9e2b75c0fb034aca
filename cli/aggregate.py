"""``secfed aggregate --kit DIR``: run the coordinator of a federation."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from secfed.cli.logs import json_log_for, run_options
from secfed.transport.status_http import DEFAULT_STATUS_LISTEN

# The text line of each event kind that prints as a template of its fields (rich markup).
_LINES = {
    "message": "  [dim]r{round} {stage:<11} <- {sender} ({bytes} B)[/dim]",
    "round_aborted": "[bold red]round {round} aborted[/bold red]: {reason}",
    "status_listening": "status page: {url}  metrics: {metrics}",
    "serving_until_stopped": "the federation finished; still serving the status page and the API "
                             "(--keep-serving): Ctrl-C or SIGTERM stops",
    "warning": "[bold yellow]warning[/bold yellow]: {warning}",
    "message_refused": "  [dim]r{round} {stage:<11} refused from {sender}: {kind} ({error})[/dim]",
    "site_refused": "  [yellow]r{round} {enterprise} refused the round ({kind})[/yellow]: {reason}",
    "site_ready": "  {enterprise} ready",
}
# Event kinds the text output leaves out.
_SILENT = ("ledger_head", "confirmed", "coordinator_stopped")


def _line(event: dict) -> str | None:
    """The text line of one coordinator event (None: not shown)."""
    kind = event["event"]
    if kind in _LINES:
        return _LINES[kind].format_map(event)
    if kind in _SILENT:
        return None
    if kind == "stage_closed":
        miss = f", missing {event['missing']}" if event["missing"] else ""
        return (f"  r{event['round']} stage [bold]{event['stage']}[/bold] closed: "
                f"{event['received']} received{miss} -> {event['next']}")
    if kind == "round_opened":
        return (f"[bold cyan]round {event['round']}[/bold cyan] opened: {event['mode']}, "
                f"{len(event['participants'])} participants, t={event['threshold']}")
    if kind == "awaiting_sites":
        return (f"waiting for {len(event['roster'])} sites to report ready (round 1 opens when "
                f"all are, at the latest in {max(0.0, event['deadline'] - event['at']):.0f} s)")
    if kind == "sites_ready":
        missing = f"; not ready: {', '.join(event['missing'])}" if event["missing"] else ""
        return f"opening round 1: {event['reason']}{missing}"
    if kind == "round_done":
        return (f"[bold green]round {event['round']} done[/bold green]: global hash "
                f"{(event['global_hash'] or '-')[:16]}, confirmed by {event['confirmed']}")
    return f"{kind}: " + ", ".join(f"{k}={v}" for k, v in event.items() if k not in ("event", "at"))


def _printer(as_json: bool):
    if as_json:
        return lambda event: click.echo(json.dumps(event, sort_keys=True, default=str), nl=True)
    from rich.console import Console

    console = Console(stderr=False, highlight=False)

    def show(event: dict) -> None:
        line = _line(event)
        if line is not None:
            console.print(line)

    return show


@click.command("aggregate")
@run_options("The coordinator's startup kit.")
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
def command(kit_dir: Path, durable: bool, status_listen: str, status_public: bool,
            keep_serving: bool, log_format: str, as_json: bool) -> None:
    """Serve the coordinator API (mutual TLS) and drive every round of the federation.

    Stops cleanly on SIGTERM or Ctrl-C (state committed; run the same command to resume).
    """
    from secfed.coordinator import run_coordinator

    log = json_log_for(log_format, "coordinator")
    sinks = [log] if log is not None else []
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
