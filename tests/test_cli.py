"""The secfed console script: help, version, one-line errors (exit 1), usage errors (exit 2)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from secfed import __version__
from secfed.cli.main import cli
from secfed.errors import BudgetExceeded, HeadroomError

SECFED = Path(sys.executable).parent / "secfed"


def run_secfed(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SECFED), *args], capture_output=True, text=True, timeout=120, check=False
    )


@pytest.fixture
def failing_command():
    """A throwaway subcommand on the real group that raises a SecfedError."""

    @click.command("explode-for-test")
    @click.option("--kind", type=click.Choice(["budget", "headroom"]), default="budget")
    def explode(kind: str) -> None:
        if kind == "budget":
            raise BudgetExceeded("epsilon spent 7.9 + needed 0.3 exceeds budget 8 (got 8.2)")
        raise HeadroomError("sum of 3 participants wraps the ring")

    cli.add_command(explode)
    yield explode
    cli.commands.pop("explode-for-test", None)


def test_help_and_version_in_process() -> None:
    runner = CliRunner()
    result = runner.invoke(cli, ["--help"])
    assert result.exit_code == 0
    assert "Usage:" in result.output and "secfed" in result.output
    result = runner.invoke(cli, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"secfed, version {__version__}"


def test_console_script_help_and_version() -> None:
    assert SECFED.exists(), f"console script missing at {SECFED}"
    help_run = run_secfed("--help")
    assert help_run.returncode == 0, help_run.stderr
    assert "Usage: secfed" in help_run.stdout
    version_run = run_secfed("--version")
    assert version_run.returncode == 0
    assert version_run.stdout.strip() == f"secfed, version {__version__}"


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("budget", "epsilon spent 7.9 + needed 0.3 exceeds budget 8 (got 8.2)"),
        ("headroom", "sum of 3 participants wraps the ring"),
    ],
)
def test_secfed_error_is_one_line_on_stderr_and_exit_1(failing_command, kind, message) -> None:
    result = CliRunner().invoke(cli, ["explode-for-test", "--kind", kind])
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.splitlines() == [f"secfed: error: {message}"]


def test_secfed_error_in_a_real_process_has_no_traceback() -> None:
    code = textwrap.dedent(
        """
        import sys, click
        from secfed.cli.main import cli, main
        from secfed.errors import ConfigError

        @cli.command("explode-for-test")
        def explode():
            raise ConfigError("threshold must be in [2, 10] (got 1)")

        sys.argv = ["secfed", "explode-for-test"]
        main()
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 1
    assert result.stderr.splitlines() == ["secfed: error: threshold must be in [2, 10] (got 1)"]
    assert result.stdout == ""


@pytest.mark.parametrize(
    "args", [["--no-such-option"], ["no-such-command"], ["explode-for-test", "--kind", "nope"]]
)
def test_usage_errors_exit_2(failing_command, args) -> None:
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2
    assert "Error" in result.stderr


def test_usage_error_exit_2_from_the_console_script() -> None:
    result = run_secfed("--no-such-option")
    assert result.returncode == 2
    assert "No such option" in result.stderr


def test_every_command_module_is_registered() -> None:
    """Each module of the cli package that defines a ``command`` is registered under its name
    (registration is explicit, so a forgotten module fails here instead of vanishing)."""
    import importlib
    import pkgutil

    import click

    import secfed.cli as package
    from secfed.cli.main import cli

    found = {}
    for info in pkgutil.iter_modules(package.__path__):
        command = getattr(importlib.import_module(f"secfed.cli.{info.name}"), "command", None)
        if isinstance(command, click.Command):
            found[command.name] = command
    assert len(found) >= 12
    assert {name: cli.commands.get(name) for name in found} == found
