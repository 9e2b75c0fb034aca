"""Options defined once and stacked on commands."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

#: A folder that must already exist (a kit, a bundle, what another party handed over).
EXISTING_DIR = click.Path(exists=True, file_okay=False, path_type=Path)

json_option = click.option(
    "--json", "as_json", is_flag=True, default=False, help="Print machine-readable JSON."
)


def stack_options(*options: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """One decorator applying ``options`` in the order given (first = first in ``--help``)."""

    def apply(f: Any) -> Any:
        for option in reversed(options):
            f = option(f)
        return f

    return apply


def kit_option(help: str) -> Callable[[Any], Any]:
    """``--kit``: the party's kit folder (it must exist)."""
    return click.option("--kit", type=EXISTING_DIR, required=True, help=help)


def bundle_import_options(kit_help: str) -> Callable[[Any], Any]:
    """``--kit``, ``--bundle`` and ``--json`` of ``coordinator import`` / ``site import``."""
    return stack_options(
        kit_option(kit_help),
        click.option("--bundle", type=EXISTING_DIR, required=True,
                     help="The admin's bundle folder."),
        json_option,
    )


def ckks_import_options(kit_help: str, from_help: str) -> Callable[[Any], Any]:
    """``--kit``, ``--from`` (passed as ``source``) and ``--json`` of ``coordinator
    ckks-import`` / ``site ckks-import``."""
    return stack_options(
        kit_option(kit_help),
        click.option("--from", "source", type=EXISTING_DIR, required=True, help=from_help),
        json_option,
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


def report_ckks_import(kit: Path, sender: str, installed: str, as_json: bool) -> None:
    """What ``coordinator ckks-import`` / ``site ckks-import`` print: what was installed in
    ``kit`` and which enterprise sent it."""
    report(as_json, {"kit": str(kit), "sender": sender},
           f"{installed} from {sender} installed in {kit}")
