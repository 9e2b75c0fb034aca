"""Bad input to the CLI: one line a user can act on (naming the option, the rule and the value),
exit status non-zero, never a traceback; warnings for settings that every site would refuse;
help text on every option (issue 22, item 7 and the list in its first section)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from secfed.cli.main import cli

URL = "https://127.0.0.1:8443"


def _invoke(args: list[str], cwd: Path) -> click.testing.Result:
    old = Path.cwd()
    os.chdir(cwd)
    try:
        return CliRunner().invoke(cli, args)
    finally:
        os.chdir(old)


def _one_error_line(result: click.testing.Result) -> str:
    assert result.exit_code == 1, (result.exit_code, result.output)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("secfed: error: "), result.stderr
    assert "Traceback" not in result.output and "pydantic" not in result.output
    return lines[0]


@pytest.mark.parametrize("bad_id", ["Energy", "a b", "-lead", "x" * 64])
def test_init_bad_enterprise_id_states_the_rule(tmp_path: Path, bad_id: str) -> None:
    result = _invoke(["federation", "init", "--name", "x", "--enterprise", bad_id,
                      "--enterprise", "b", "--coordinator-url", URL, "--synthetic-dim", "8",
                      "--out", "kits"], tmp_path)
    line = _one_error_line(result)
    assert "--enterprise must be 1 to 63 characters: lower-case letters a-z, digits, '_' or '-'" \
        ", starting with a letter or digit" in line
    assert line.endswith(f"(got {bad_id!r})")
    assert not (tmp_path / "kits").exists()  # refused before anything is written


def test_site_init_bad_id_states_the_same_rule(tmp_path: Path) -> None:
    (tmp_path / "invitation.toml").write_text("")
    result = _invoke(["site", "init", "--invitation", "invitation.toml", "--id", "Energy",
                      "--out", "site"], tmp_path)
    line = _one_error_line(result)
    assert "--id must be 1 to 63 characters: lower-case letters a-z" in line
    assert line.endswith("(got 'Energy')")


def test_coordinator_url_without_scheme_says_got_once(tmp_path: Path) -> None:
    result = _invoke(["federation", "init", "--name", "x", "--enterprise", "a", "--enterprise",
                      "b", "--coordinator-url", "127.0.0.1:8443", "--synthetic-dim", "8",
                      "--out", "kits"], tmp_path)
    line = _one_error_line(result)
    assert "coordinator_url: must be https://HOST:PORT (got '127.0.0.1:8443')" in line
    assert line.count("(got ") == 1 and "Value error" not in line


def test_noise_multiplier_every_default_site_refuses_is_warned(tmp_path: Path) -> None:
    args = ["federation", "invite", "--name", "x", "--coordinator-url", URL, "--synthetic-dim", "8",
            "--json"]
    low = _invoke([*args, "--noise-multiplier", "0.01", "--out", "low"], tmp_path)
    assert low.exit_code == 0, low.output
    warnings = [line for line in low.stderr.splitlines() if line.startswith("secfed: warning: ")]
    assert len(warnings) == 1, low.stderr
    assert "--noise-multiplier 0.01 is below the default site policy's min_noise_multiplier 0.5" \
        in warnings[0]
    json.loads(low.stdout)  # --json output unchanged: still one JSON document on stdout
    ok = _invoke([*args, "--noise-multiplier", "0.8", "--out", "ok"], tmp_path)
    assert ok.exit_code == 0 and "warning" not in ok.stderr, ok.stderr
    calibrated = _invoke([*args, "--out", "calibrated"], tmp_path)
    assert calibrated.exit_code == 0 and "warning" not in calibrated.stderr


def test_rounds_past_the_default_site_budget_are_warned(tmp_path: Path) -> None:
    """σ given explicitly for more rounds than the default site budget (ε = target, RDP gate)
    holds: init names the first round every default site refuses (issue 22 item 6)."""
    import re

    from secfed.privacy import DPSGDEvent, compose_epsilon

    args = ["federation", "invite", "--name", "x", "--coordinator-url", URL, "--synthetic-dim", "8",
            "--noise-multiplier", "0.8", "--sample-rate", "0.05", "--local-steps", "20",
            "--epsilon", "8", "--json"]
    many = _invoke([*args, "--rounds", "200", "--out", "many"], tmp_path)
    assert many.exit_code == 0, many.output
    json.loads(many.stdout)
    warnings = [ln for ln in many.stderr.splitlines() if ln.startswith("secfed: warning: ")]
    assert len(warnings) == 1, many.stderr
    fit = int(re.search(r"fits (\d+) of the 200 --rounds", warnings[0]).group(1))
    assert f"refuses round {fit + 1} and later" in warnings[0]

    def eps(rounds: int) -> float:
        return compose_epsilon([DPSGDEvent(noise_multiplier=0.8, sample_rate=0.05,
                                           steps=20 * rounds)], delta=1e-5, accountant="rdp")

    assert eps(fit) <= 8.0 < eps(fit + 1)  # the warning names exactly the first refused round
    few = _invoke([*args, "--rounds", str(fit), "--out", "few"], tmp_path)
    assert few.exit_code == 0 and "warning" not in few.stderr, few.stderr


@pytest.mark.parametrize(("mode", "bound"), [("secagg", "[2, 9]"), ("secagg+", "[2, 9]"),
                                             ("ckks", "[1, 10]")])
def test_simulate_threshold_too_large_names_threshold(tmp_path: Path, mode: str, bound: str) -> None:
    result = _invoke(["simulate", "--participants", "10", "--mode", mode, "--threshold", "20",
                      "--dim", "8"], tmp_path)
    assert result.exit_code == 2
    assert f"Invalid value for --threshold: must be in {bound} for 10 participants" in result.stderr
    assert "min_participants" not in result.stderr and "Traceback" not in result.output


def test_simulate_help_says_drop_indices_are_zero_based() -> None:
    result = CliRunner().invoke(cli, ["simulate", "--help"])
    assert result.exit_code == 0
    assert "0-based indices, 0 to n-1" in " ".join(result.output.split())


def _commands(group: click.Group, path: tuple[str, ...] = ()):
    for name, command in sorted(group.commands.items()):
        if isinstance(command, click.Group):
            yield from _commands(command, (*path, name))
        else:
            yield (*path, name), command


def test_every_visible_option_has_help_text() -> None:
    missing = [f"secfed {' '.join(path)} {option.opts[0]}" for path, command in _commands(cli)
               for option in command.params
               if isinstance(option, click.Option) and not option.hidden and not option.help]
    assert missing == []
    seen = {(" ".join(path), o.opts[0]) for path, c in _commands(cli) for o in c.params
            if isinstance(o, click.Option)}
    for named in [("join", "--max-rounds"), ("federation init", "--rounds"),
                  ("federation init", "--min-participants"), ("federation init", "--out")]:
        assert named in seen, named  # the options the issue named still exist


def test_budget_status_imports_no_torch(tmp_path: Path) -> None:
    """A budget look answers without importing torch (the seconds it took before): chain,
    signatures and RDP ε verified, PRV reported as recorded."""
    from secfed.crypto.keys import IdentityKey
    from secfed.privacy import DPSGDEvent, Ledger

    path = tmp_path / "ledger.sqlite"
    with Ledger.open(path, enterprise_id="acme", identity=IdentityKey.generate(),
                     budget_epsilon=8.0, delta=1e-5, create=True) as ledger:
        for r in range(1, 4):
            ledger.charge(round_number=r, session_id=bytes([r]) * 32,
                          event=DPSGDEvent(noise_multiplier=1.2, sample_rate=0.02, steps=50))
    code = ("import atexit, sys\n"
            "atexit.register(lambda: sys.stderr.write("
            "'HEAVY=' + ','.join(m for m in ('torch', 'opacus') if m in sys.modules) + '\\n'))\n"
            f"sys.argv = ['secfed', 'budget', 'status', '--ledger', {str(path)!r}]\n"
            "from secfed.cli.main import main\n"
            "main()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY=\n" in proc.stderr, proc.stderr
    assert "verdict     OK: 3 entries" in proc.stdout and "RDP epsilon verified" in proc.stdout
    assert "(PRV, as recorded)" in proc.stdout


def test_join_lines_hold_no_python_dicts_or_lists() -> None:
    from secfed.cli.join import describe

    events = [
        {"event": "training", "round": 1, "mode": "secagg"},
        {"event": "charged", "round": 1, "epsilon": 4.847727112149414, "distributed_dp": None},
        {"event": "round_report", "round": 1, "status": "done", "mode": "secagg",
         "survivors": ["a", "b", "c"], "epsilon": 4.847727112149414,
         "metrics": {"accuracy": 0.7123}, "detail": '{"distributed_dp": {"survivors": 3}}'},
        {"event": "round_refused", "round": 2, "reason": "noise_multiplier must be >= 0.5"},
        {"event": "round_aborted", "round": 3, "reason": "1 of 3 participants advertised keys"},
        {"event": "distributed_dp", "round": 4, "planned_shares": 3, "survivors": 3,
         "clipped": False, "epsilon_ledger": 3.25, "epsilon_survivors": 3.125},
    ]
    lines = [describe(e) for e in events]
    assert lines[0] == "round 1 (secagg): training with DP-SGD"
    assert lines[2] == "round 1 done (secagg, 3 survivors): epsilon 4.848; accuracy 0.7123"
    assert lines[4] == "round 3 aborted: 1 of 3 participants advertised keys"
    for line in lines:
        assert line and not any(c in line for c in "{}[]'"), line
    assert describe({"event": "round_report", "round": 2, "status": "refused", "mode": "secagg",
                     "detail": "x"}) is None  # its round_refused line said why
