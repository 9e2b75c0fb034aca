"""``secfed coordinator``: the coordinator's enrolment commands (its keys are made here)."""

from __future__ import annotations

from pathlib import Path

import click

from secfed.cli.options import (
    bundle_import_options,
    ckks_import_options,
    json_option,
    report,
    report_ckks_import,
    report_import,
)


@click.group("coordinator")
def command() -> None:
    """Enrol the coordinator: its own keys, the admin's bundle, the CKKS public context."""


@command.command("init")
@click.option("--invitation", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              required=True, help="The admin's invitation.toml.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="The coordinator's kit folder (new or empty).")
@click.option("--request", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Where to write the request for the admin [default: OUT/request.toml].")
@click.option("--force", is_flag=True, help="Replace a non-empty --out directory.")
@json_option
def init(invitation: Path, out: Path, request: Path | None, force: bool, as_json: bool) -> None:
    """Make the coordinator's TLS and identity keys locally; write its request for the admin."""
    from secfed.federation.enrol import coordinator_init

    path = coordinator_init(invitation, out, request=request, force=force)
    report(as_json, {"kit": str(out), "request": str(path)},
           f"coordinator: keys made under {out} (they stay there)", f"  send {path} to the admin")


@command.command("import")
@bundle_import_options("The coordinator's kit folder.")
def import_bundle(kit: Path, bundle: Path, as_json: bool) -> None:
    """Check the admin's bundle against the invitation and the coordinator's keys; install it."""
    from secfed.federation.enrol import coordinator_import

    report_import(kit, coordinator_import(kit, bundle), as_json)


@command.command("ckks-import")
@ckks_import_options("The coordinator's kit folder.", "The folder written by a site's "
                     "ckks-keygen (only its public context is read).")
def ckks_import(kit: Path, source: Path, as_json: bool) -> None:
    """Install the key-free CKKS public context after checking its sender's signature."""
    from secfed.federation.enrol import coordinator_ckks_import

    report_ckks_import(kit, coordinator_ckks_import(kit, source), "CKKS public context", as_json)
