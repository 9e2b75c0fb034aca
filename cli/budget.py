"""``secfed budget status``: an enterprise's privacy budget, from its verified ledger."""

from __future__ import annotations

from pathlib import Path

import click

from secfed.cli.options import emit_json, json_option
from secfed.errors import ConfigError, LedgerVerificationError, SecfedError


def load_public_key(value: str) -> bytes:
    """A 32-byte Ed25519 public key from 64 hex characters or a file (hex, raw, or PEM; parsed
    by :func:`secfed.crypto.keys.ed25519_public_key_from`).

    Raises:
        ConfigError: not a key in any of those forms.
    """
    text = value.strip()
    if len(text) == 64:
        try:
            return bytes.fromhex(text)
        except ValueError:
            pass
    path = Path(value)
    if not path.is_file():
        raise ConfigError(f"--identity must be 64 hex characters or a key file (got {value!r})")
    from secfed.crypto.keys import ed25519_public_key_from

    return ed25519_public_key_from(path.read_bytes(), source=f"--identity file {path}")


@click.group(name="budget")
def command() -> None:
    """Privacy budget of an enterprise (from its signed ledger)."""


@command.command(name="status")
@click.option("--ledger", "ledger_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The enterprise's ledger.sqlite.")
@click.option("--identity", default=None,
              help="Pinned Ed25519 public key: 64 hex chars or a file (hex/raw/PEM). "
                   "Without it the key recorded in the ledger is used (not pinned).")
@click.option("--prv", "prv", type=click.Choice(["recorded", "newest", "all"]), default="recorded",
              show_default=True,
              help="PRV epsilon: as the signed ledger recorded it, or recomputed for the newest "
                   "entry or for every entry (seconds more: Opacus' PRV accountant imports "
                   "torch). RDP, what the budget enforces, is always recomputed for every entry.")
@click.option("--fast", is_flag=True, default=False, hidden=True,
              help="Same as --prv newest (kept for scripts).")
@json_option
def status(ledger_path: Path, identity: str | None, prv: str, fast: bool, as_json: bool) -> None:
    """Budget, spent (PRV, RDP), delta, remaining, rounds and the verification verdict.

    Answers in about a second: chain, signatures and RDP epsilon are checked for every entry;
    `secfed audit` (or --prv all) recomputes every PRV figure too.
    Exits 1 when the ledger fails verification (the failing entry is named).
    """
    from secfed.privacy.ledger import read_ledger, verify_ledger

    prv = "newest" if fast and prv == "recorded" else prv
    public_key = load_public_key(identity) if identity is not None else None
    try:
        report = verify_ledger(ledger_path, public_key=public_key, recompute_prv=prv == "all",
                               skip_prv=prv == "recorded")
    except LedgerVerificationError as exc:
        entries = []
        try:
            entries = read_ledger(ledger_path)
        except SecfedError:  # unreadable rows: the verdict below is what matters
            pass
        result = {"ledger": str(ledger_path), "verified": False, "failed_entry": exc.entry,
                  "reason": str(exc), "entries": len(entries)}
        if as_json:
            emit_json(result)
        else:
            click.echo(f"ledger      {ledger_path}")
            click.echo(f"verdict     FAILED at entry {exc.entry}: {exc}")
        raise SystemExit(1) from None
    result = {"ledger": str(ledger_path), "verified": True, "prv_recomputed": prv,
              **report.to_dict()}
    if as_json:
        emit_json(result)
        return
    pinned = "pinned key" if report.key_pinned else "key from the ledger file (NOT pinned)"
    rounds = report.rounds
    click.echo(f"ledger      {ledger_path}")
    click.echo(f"enterprise  {report.enterprise_id}")
    click.echo(f"budget      epsilon {report.budget:g} at delta {report.delta:.3g} ({report.budget_accountant} enforces)")
    how = {"recorded": "as recorded", "newest": "recomputed", "all": "recomputed"}[prv]
    click.echo(f"spent       epsilon {report.eps_rdp:.4f} (RDP, recomputed), "
               f"{report.eps_prv:.4f} (PRV, {how})")
    click.echo(f"remaining   epsilon {report.remaining:.4f}")
    click.echo(f"rounds      {len(rounds)}" + (f" (rounds {rounds[0]}..{rounds[-1]})" if rounds else ""))
    checked = {"recorded": "RDP epsilon", "newest": "RDP epsilon (PRV: newest entry)",
               "all": "RDP and PRV epsilon"}[prv]
    click.echo(f"verdict     OK: {len(report.entries)} entries, hash chain, signatures ({pinned}) "
               f"and {checked} verified")
