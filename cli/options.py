"""Options defined once and stacked on commands."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

json_option = click.option(
    "--json", "as_json", is_flag=True, default=False, help="Print machine-readable JSON."
)


def emit_json(obj: Any) -> None:
    """Print one JSON document on stdout."""
    click.echo(json.dumps(obj, indent=2, sort_keys=True, default=str))


def fail(message: str, code: int = 1) -> None:
    """One line on stderr, then exit non-zero."""
    click.echo(f"secfed: error: {message}", err=True)
    sys.exit(code)
