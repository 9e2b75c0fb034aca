"""README "Using it": its commands run as written in an empty folder (MODEL_DIR and DATA_DIR
filled in with the tiny city-safety model and one site's tiny data)."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest

from secfed.transport.kits import CoordinatorKit, EnterpriseKit

README = Path(__file__).resolve().parents[2] / "README.md"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
# need a running / finished federation, or (data check, ~40 s on 2 busy cores: run by the slow
# test; the default one parses its arguments against the real command)
RUN_LATER = ("aggregate", "join", "budget", "audit", "data")


def readme_commands() -> list[str]:
    """The "Using it" block's commands: continuation lines joined, comments dropped."""
    section = README.read_text().split("## Using it", 1)[1]
    block = section.split("```", 2)[1]
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
