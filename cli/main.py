"""The ``secfed`` console script.

Each subcommand lives in its own module in this package and exposes ``command`` (a click
command or group), registered explicitly below: a missing module is an import error, never a
silently absent command. Heavy imports (torch, tenseal) happen
inside the commands so ``secfed --help`` stays fast. Any :class:`SecfedError` becomes one line on
stderr and exit status 1; click usage errors exit 2.
"""

from __future__ import annotations

import sys

import click

from secfed import __version__
from secfed.errors import SecfedError


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


# After the group: the command modules import nothing heavy at module level.
from secfed.cli import (  # noqa: E402
    aggregate,
    audit,
    budget,
    contributions,
    coordinator,
    data,
    demo,
    federation,
    flower,
    join,
    model,
    simulate,
    site,
)

for _module in (federation, coordinator, site, aggregate, join, simulate, budget, audit,
                contributions, data, demo, model, flower):
    cli.add_command(_module.command)


def main() -> None:
    """Entry point of the console script."""
    cli.main(prog_name="secfed")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
