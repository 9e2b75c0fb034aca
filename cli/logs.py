"""``--log-format json`` for long-running commands (``aggregate``, ``join``).

One JSON object per line on stderr, for a log shipper: ``ts`` (ISO 8601 UTC), ``level``,
``component`` (coordinator | participant), ``event`` and always the keys ``round``, ``stage``,
``enterprise`` (null where they do not apply), then the event's other fields. Events carry
numbers, names, hashes and reasons; a field that could hold key material, shares or vectors
is dropped here as a second line of defence (:data:`_WITHHELD`), and bytes never pass.
``--json`` keeps printing the machine output on stdout, independently.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from collections.abc import Callable
from typing import Any, TextIO

import click

from secfed.cli.options import EXISTING_DIR, json_option, stack_options

__all__ = ["log_format_option", "run_options", "json_log_sink", "json_log_for", "LEVELS"]

log_format_option = click.option(
    "--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True,
    help="json: one JSON event per line on stderr (ts, level, component, event, round, stage, "
         "enterprise, ...) instead of the readable text.")


def run_options(kit_help: str) -> Callable[[Any], Any]:
    """The options the long-running commands share: ``--kit`` (passed as ``kit_dir``),
    ``--log-format`` and ``--json``."""
    return stack_options(
        click.option("--kit", "kit_dir", type=EXISTING_DIR, required=True, help=kit_help),
        log_format_option,
        json_option,
    )


# Events worth more than "info" to an operator.
LEVELS = {
    "round_aborted": "warning", "round_refused": "warning", "message_refused": "warning",
    "site_refused": "warning", "hash_disagreement": "error", "peers_disagree": "error",
    "receipt_refused": "error", "receipt_missing": "warning", "warning": "warning",
    "ledger_created": "warning", "retry": "warning", "coordinator_stopped": "warning",
    "refusal_not_delivered": "warning", "ready_not_delivered": "warning",
    "message": "debug", "stage": "debug", "ledger_head": "debug",
}
# Field names that never go to a log, whatever an event carries (defence in depth).
_WITHHELD = ("key", "secret", "share", "seed", "payload", "mask", "vector", "update", "signature_hex")
_FIXED = ("round", "stage", "enterprise")


def _withheld(name: str) -> bool:
    low = name.lower()
    return any(w in low for w in _WITHHELD)


def _clean(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return f"<{len(value)} bytes withheld>"
    if isinstance(value, dict):
        return {k: ("<withheld>" if _withheld(str(k)) else _clean(v)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def log_record(event: dict[str, Any], component: str) -> dict[str, Any]:
    """The log line of one event (a dict; see the module docstring)."""
    at = event.get("at")
    ts = dt.datetime.fromtimestamp(float(at) if at is not None else dt.datetime.now().timestamp(),
                                   tz=dt.UTC).isoformat(timespec="milliseconds")
    kind = str(event.get("event", "unknown"))
    record: dict[str, Any] = {"ts": ts, "level": LEVELS.get(kind, "info"),
                              "component": component, "event": kind}
    record["round"] = event.get("round")
    record["stage"] = event.get("stage")
    record["enterprise"] = event.get("enterprise", event.get("sender"))
    for name, value in event.items():
        if name in ("event", "at", "sender", *_FIXED):
            continue
        record[name] = "<withheld>" if _withheld(name) else _clean(value)
    return record


def json_log_sink(component: str, stream: TextIO | None = None) -> Callable[[dict], None]:
    """An event sink writing one JSON log line per event to ``stream`` (default stderr)."""

    def sink(event: dict[str, Any]) -> None:
        out = stream or sys.stderr
        out.write(json.dumps(log_record(event, component), sort_keys=False, default=str) + "\n")
        out.flush()

    return sink


def json_log_for(log_format: str, component: str) -> Callable[[dict], None] | None:
    """The sink of ``--log-format json`` for ``component`` (None for ``text``). With JSON,
    secfed's own progress lines are turned off: stderr carries only the JSON events."""
    if log_format != "json":
        return None
    from secfed import progress

    progress.configure("off")
    return json_log_sink(component)
