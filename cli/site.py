"""``secfed site``: a site's enrolment commands (its keys are made here and never leave)."""

from __future__ import annotations

from pathlib import Path

import click

from secfed.cli.options import (
    bundle_import_options,
    ckks_import_options,
    json_option,
    kit_option,
    report,
    report_ckks_import,
    report_import,
)

_DIR = click.Path(file_okay=False, path_type=Path)


@click.group("site")
def command() -> None:
    """Enrol this site: its own keys, the admin's bundle, the CKKS secret."""


@command.command("init")
@click.option("--invitation", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              required=True, help="The admin's invitation.toml.")
@click.option("--id", "enterprise_id", required=True, help="This enterprise's id (its TLS name).")
@click.option("--out", type=_DIR, required=True, help="This site's kit folder (new or empty).")
@click.option("--request", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Where to write the request for the admin [default: OUT/request.toml].")
@click.option("--budget-epsilon", type=float, default=None,
              help="This site's own epsilon budget [default: the invitation's target epsilon].")
@click.option("--min-noise-multiplier", type=float, default=0.5, show_default=True,
              help="This site refuses rounds with a smaller DP-SGD sigma.")
@click.option("--force", is_flag=True, help="Replace a non-empty --out directory.")
@json_option
def init(invitation: Path, enterprise_id: str, out: Path, request: Path | None,
         budget_epsilon: float | None, min_noise_multiplier: float, force: bool,
         as_json: bool) -> None:
    """Make this site's identity, TLS and (ckks federations) X25519 keys locally; write the
    request (public material only) to send to the admin."""
    from secfed.federation.enrol import site_init

    path = site_init(invitation, enterprise_id, out, request=request, budget_epsilon=budget_epsilon,
                     min_noise_multiplier=min_noise_multiplier, force=force)
    report(as_json, {"kit": str(out), "request": str(path)},
           f"site {enterprise_id}: keys made under {out} (they stay there)",
           f"  send {path} to the admin")


@command.command("import")
@bundle_import_options("This site's kit folder (from site init).")
def import_(kit: Path, bundle: Path, as_json: bool) -> None:
    """Check the admin's bundle against this site's invitation and keys, then install it."""
    from secfed.federation.enrol import site_import

    fed = site_import(kit, bundle)
    report_import(kit, fed, as_json, uses_ckks="ckks" in fed.mode_schedule)


@command.command("ckks-keygen")
@kit_option("This site's kit folder.")
@click.option("--out", type=_DIR, required=True,
              help="Folder for the sealed copies and the public context (hand it on: nothing in "
                   "it opens without a site's own key).")
@click.option("--force", is_flag=True, help="Replace an existing CKKS secret / --out folder.")
@json_option
def ckks_keygen(kit: Path, out: Path, force: bool, as_json: bool) -> None:
    """Make the federation's CKKS secret here; seal one copy to each other enterprise."""
    from secfed.federation.enrol import ckks_keygen as keygen

    copies = keygen(kit, out, force=force)
    report(as_json, {"kit": str(kit), "out": str(out), "copies": [str(p) for p in copies]},
           f"CKKS secret made in {kit}; {len(copies)} sealed copies and the public context "
           f"under {out}")


@command.command("ckks-import")
@ckks_import_options("This site's kit folder.", "The folder written by another site's ckks-keygen.")
def ckks_import(kit: Path, source: Path, as_json: bool) -> None:
    """Open this site's sealed copy of the CKKS secret and install it."""
    from secfed.federation.enrol import site_ckks_import

    report_ckks_import(kit, site_ckks_import(kit, source), "CKKS secret", as_json)
