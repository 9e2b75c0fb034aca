"""README: "Your own federation" runs as written in an empty folder (bash, ``secfed`` on PATH),
and "Enrolling parties on separate machines" runs as written with MODEL_DIR and DATA_DIR filled
in with the tiny city-safety model and one site's tiny data."""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest

from secfed.federation.kits import CoordinatorKit, EnterpriseKit

README = Path(__file__).resolve().parents[2] / "README.md"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
# need a running / finished federation, or (data check, ~40 s on 2 busy cores: run by the slow
# test; the default one parses its arguments against the real command)
RUN_LATER = ("aggregate", "join", "budget", "audit", "data")


OWN = "## Your own federation"
SEPARATE = "## Enrolling parties on separate machines"


def readme_block(heading: str) -> str:
    """The first code block under ``heading`` in the README."""
    section = README.read_text().split(f"\n{heading}\n", 1)[1]
    assert section.split("\n## ", 1)[0].count("```") >= 2, f"no code block under {heading}"
    return section.split("```", 2)[1].split("\n", 1)[1]


def readme_commands() -> list[str]:
    """The separate-machines block's commands: continuation lines joined, comments dropped."""
    block = readme_block(SEPARATE)
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            commands.append(line)
    return commands


def _argv(command: str, model_dir: Path, data_dir: Path) -> list[str]:
    argv = shlex.split(command.replace("MODEL_DIR", str(model_dir)).replace("DATA_DIR", str(data_dir)))
    assert argv[0] == "secfed", command
    return [sys.executable, "-m", "secfed.cli.main", *argv[1:]]


def _enrol(tmp_path: Path, model_bundle, federation) -> list[str]:
    """Run every README command but the federation's own (returned) in ``tmp_path``."""
    _, model_dir = model_bundle
    later = []
    for command in readme_commands():
        if command.split()[1] in RUN_LATER:
            later.append(command)
            continue
        proc = subprocess.run(_argv(command, model_dir, federation.enterprises["energy_utility"]),
                              cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, (command, proc.stderr[-2000:])
    return later


def test_readme_commands_run_as_written(tmp_path: Path, model_bundle, federation,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    commands = readme_commands()
    assert any(c.startswith("secfed federation invite") for c in commands)
    later = _enrol(tmp_path, model_bundle, federation)
    assert [c.split()[1] for c in later] == ["aggregate", "join", "budget", "audit", "data"]
    from secfed.cli.main import cli

    _, model_dir = model_bundle
    monkeypatch.chdir(tmp_path)  # the README's relative paths
    for command in later:  # every option the README gives exists, with a value of its type
        argv = _argv(command, model_dir, federation.enterprises["energy_utility"])[3:]
        group = cli
        while isinstance(group, click.Group):
            group = group.get_command(click.Context(cli), argv.pop(0))
        assert group is not None, command
        made = [Path(a) for a in argv if a.endswith(".sqlite") and not Path(a).exists()]
        for path in made:  # written by the run; parsing only checks they exist
            path.touch()
        group.make_context(command, argv, resilient_parsing=False)
        for path in made:
            path.unlink()
    # what the federation's commands name was made by the enrolment above
    coordinator = CoordinatorKit.load(tmp_path / "coordinator")
    sites = coordinator.federation.enterprise_ids()
    assert set(sites) == {"energy_utility", "city_operations", "residential_security"}
    for eid in sites:
        kit = EnterpriseKit.load(tmp_path / eid)
        assert kit.identity().public_bytes() == coordinator.federation.public_key_of(eid)
        assert (tmp_path / eid / "ckks_secret.ctx").is_file()
    assert (tmp_path / "coordinator" / "ckks_public.ctx").is_file()
    assert not list((tmp_path / "admin").glob("*.ctx"))
    joined = " ".join(later)
    assert "--kit coordinator" in joined and "--kit energy_utility" in joined
    for eid in sites:
        assert f"--ledger {eid}/ledger.sqlite" in joined, eid  # the audit reads every ledger


@pytest.mark.slow
def test_readme_federation_runs_and_audits(tmp_path: Path, model_bundle, federation) -> None:
    """The README's aggregate / join (one per site, as its comment says) / budget / audit lines,
    on the tiny model and data: the federation finishes its rounds and the audit passes."""
    _, model_dir = model_bundle
    later = _enrol(tmp_path, model_bundle, federation)
    aggregate, join, budget, audit, check = later
    procs = [subprocess.Popen(_argv(aggregate, model_dir, Path("unused")), cwd=tmp_path, env=ENV,
                              stdout=open(tmp_path / "coordinator.log", "wb"),
                              stderr=subprocess.STDOUT)]
    for eid, data in federation.enterprises.items():
        argv = _argv(join.replace("energy_utility", eid), model_dir, data)
        procs.append(subprocess.Popen(argv, cwd=tmp_path, env=ENV,
                                      stdout=open(tmp_path / f"{eid}.log", "wb"),
                                      stderr=subprocess.STDOUT))
    try:
        end = time.monotonic() + 1500
        for p in procs:
            assert p.wait(timeout=max(1, end - time.monotonic())) == 0, \
                (tmp_path / "coordinator.log").read_text()[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for command in (budget, audit, check):
        data = federation.enterprises["energy_utility"]
        proc = subprocess.run(_argv(command, model_dir, data), cwd=tmp_path, env=ENV,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, (command, proc.stdout[-2000:], proc.stderr[-2000:])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _own_script() -> str:
    """The "Your own federation" block as a bash script; only the coordinator's port is changed
    (to a free one, so parallel test runs never collide on 8443)."""
    block = readme_block(OWN)
    assert "https://127.0.0.1:8443" in block
    block = block.replace("https://127.0.0.1:8443", f"https://127.0.0.1:{_free_port()}")
    return "set -euo pipefail\n" + block + "\n"


def _bash(script: str, cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {**ENV, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(["bash", "-c", script], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


SITES = ("energy_utility", "city_operations", "residential_security")


def own_commands() -> list[list[str]]:
    """The own-federation block's ``secfed`` commands as argv lists: continuation lines joined,
    comments, ``&`` and redirections dropped, the ``for site`` loop's body once per site."""
    commands = []
    for line in readme_block(OWN).replace("\\\n", " ").splitlines():
        line = line.split("#", 1)[0].strip()
        if not line.startswith("secfed "):
            continue
        words = shlex.split(line)
        for stop in (">", "&"):
            words = words[:words.index(stop)] if stop in words else words
        runs = [[w.replace("$site", s) for w in words] for s in SITES] if "$site" in line \
            else [words]
        commands += runs
    return commands


def _check_parses(argv: list[str]) -> None:
    """Every option of ``argv`` exists on its click command, takes a value exactly when the
    command says so, and every required option is given (values are checked by the slow run)."""
    from secfed.cli.main import cli

    command: click.Command | None = cli
    rest = argv[1:]
    while isinstance(command, click.Group):
        command = command.get_command(click.Context(cli), rest.pop(0))
    assert command is not None, argv
    options = {name: p for p in command.params if isinstance(p, click.Option)
               for name in (*p.opts, *p.secondary_opts)}
    given = set()
    while rest:
        word = rest.pop(0)
        assert word in options, (argv, word)
        given.add(options[word].name)
        if not options[word].is_flag:
            assert rest and not rest[0].startswith("--"), (argv, word)
            rest.pop(0)
    missing = [p.name for p in command.params if p.required and p.name not in given]
    assert not missing, (argv, missing)


def test_readme_own_federation_commands_parse() -> None:
    """The block runs init, the coordinator, a join per site, budget and audit; each command's
    options exist with values where they need them; kits, ledgers and data it names agree."""
    commands = own_commands()
    verbs = [" ".join(c[1:3]) for c in commands]
    assert verbs[:2] == ["demo prepare", "federation init"]
    assert verbs.count("join --kit") == len(SITES) and "aggregate --kit" in verbs
    for argv in commands:
        _check_parses(argv)
    init = commands[1]
    assert [init[i + 1] for i, w in enumerate(init) if w == "--enterprise"] == list(SITES)
    audit = next(c for c in commands if c[1] == "audit")
    assert [audit[i + 1] for i, w in enumerate(audit) if w == "--ledger"] == \
        [f"kits/{s}/ledger.sqlite" for s in SITES]  # the audit reads every ledger
    for argv in (c for c in commands if c[1] == "join"):
        site = argv[argv.index("--kit") + 1].split("/")[1]
        assert argv[argv.index("--data") + 1] == f"prep/data/{site}"


@pytest.mark.slow
def test_readme_own_federation_runs_as_written(tmp_path: Path) -> None:
    """The whole block as written, in an empty folder (bash, ``set -e``: any failing line fails
    it): the kits it makes, every round charged at every site, the budget printed, the audit
    passes with its report."""
    proc = _bash(_own_script(), tmp_path, timeout=1500)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    from secfed.privacy.ledger import read_ledger

    coordinator = CoordinatorKit.load(tmp_path / "kits" / "coordinator")
    assert tuple(coordinator.federation.enterprise_ids()) == SITES
    assert coordinator.federation.model.trainable == "head"
    rounds = coordinator.federation.rounds
    for eid in SITES:
        assert EnterpriseKit.load(tmp_path / "kits" / eid).identity().public_bytes() \
            == coordinator.federation.public_key_of(eid)
        charged = {e.round_number for e in read_ledger(tmp_path / "kits" / eid / "ledger.sqlite")}
        assert charged == set(range(1, rounds + 1)), (eid, charged,
                                                      (tmp_path / f"{eid}.log").read_text()[-2000:])
    assert "energy_utility" in proc.stdout  # budget status names the site
    for eid in SITES:  # join's progress, on stderr (plain lines: not a terminal)
        assert f"secfed: {eid}: loading the model and data, computing tower features: done" \
            in proc.stderr, proc.stderr[-3000:]
    assert (tmp_path / "report" / "report.html").is_file()
