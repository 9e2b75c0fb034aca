"""Options defined once and stacked on commands."""

from __future__ import annotations

import json
import sys
from pathlib import Path
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


def report(as_json: bool, data: dict[str, Any], *lines: str) -> None:
    """A command's result: ``data`` as one JSON document with ``--json``, else ``lines``."""
    if as_json:
        emit_json(data)
    else:
        for line in lines:
            click.echo(line)


def report_import(kit: Path, fed: Any, as_json: bool, **extra: Any) -> None:
    """What ``coordinator import`` / ``site import`` print: the roster and the fingerprint of
    the installed ``federation.toml`` that the parties compare out of band."""
    from secfed.federation.enrol import FEDERATION_FILE, fingerprint

    digest = fingerprint(kit / FEDERATION_FILE)
    report(as_json, {"kit": str(kit), "roster": list(fed.enterprise_ids()),
                     "federation_sha256": digest, **extra},
           f"bundle installed in {kit}; roster: {', '.join(fed.enterprise_ids())}",
           f"  federation.toml sha256: {digest} (compare it with the other parties)")
