"""The ``secfed`` console script.

Each subcommand lives in its own module in this package and exposes ``command`` (a click
command or group); :data:`COMMAND_MODULES` lists them. Heavy imports (torch, tenseal) happen
inside the commands so ``secfed --help`` stays fast. Any :class:`SecfedError` becomes one line on
stderr and exit status 1; click usage errors exit 2.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

import click

from secfed import __version__
from secfed.crypto.errors import SecfedError

COMMAND_MODULES = (
    "federation",
    "coordinator",
    "site",
    "aggregate",
    "join",
    "simulate",
    "budget",
    "audit",
    "contributions",
    "data",
    "demo",
    "model",
    "flower",
)


class SecfedGroup(click.Group):
    """A group that turns SecfedError into one line on stderr and exit 1."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except SecfedError as exc:
            click.echo(f"secfed: error: {exc}", err=True)
            ctx.exit(1)
        except KeyboardInterrupt:
            click.echo("secfed: interrupted", err=True)
            ctx.exit(130)


@click.group(cls=SecfedGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="secfed")
def cli() -> None:
    """secfed: secure aggregation and per-enterprise privacy ledgers for federated fine-tuning.

    Long work shows progress on stderr (a bar on a terminal, one line per step otherwise;
    SECFED_PROGRESS=rich|plain|off chooses), so --json output is the only thing on stdout.
    """
    from secfed import progress

    progress.quiet_libraries()  # secfed's own progress instead of transformers' loading bars


def _register() -> None:
    for name in COMMAND_MODULES:
        modname = f"secfed.cli.{name}"
        if importlib.util.find_spec(modname) is None:
            continue
        module = importlib.import_module(modname)
        command = getattr(module, "command", None)
        if isinstance(command, click.Command):
            cli.add_command(command)


_register()


def main() -> None:
    """Entry point of the console script."""
    cli.main(prog_name="secfed")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
