"""``make demo``: a whole federation on this machine, as separate processes over mutual TLS.

Builds the city-safety demo data and model locally (``secfed.tasks.citysafety``), enrols
three enterprises (energy utility, residential security operator, city operations centre) and
the coordinator the way a real federation does, on this machine (``secfed federation init`` =
:func:`secfed.federation.kits.create_kits`: the admin's invitation, each party's own keys and
request, the admin's signature, each party's import, the first enterprise's CKKS secret sealed
to the others; one folder per party under ``kits/``), starts ``secfed aggregate`` and three ``secfed join`` processes on loopback,
runs 20 rounds (three in ``secagg`` mode, then one in ``ckks``, repeated), prints per-round
accuracy and epsilon per enterprise, and writes the audit report. Everything lands under the
output directory.

What the sites train: the fusion head on the frozen towers (``--trainable head``), so each site
computes its records' tower features once and runs DP-SGD (Adam, cosine learning rate over the
rounds) on the head. At the demo's data scale (thousands of records per site) that learns under
DP at eps=8; LoRA through both towers (``adapter``, the federation default) costs minutes per
round on 2 cores, and at a few hundred records per site DP-SGD learned nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import IO, Any

from secfed import progress
from secfed.errors import SecfedError
from secfed.names import FEATURE_SCOPES

__all__ = ["DemoSettings", "DemoResult", "run_demo"]

SCHEDULE = ("secagg", "secagg", "secagg", "ckks")


@dataclass(frozen=True)
class DemoSettings:
    seed: int = 7
    scale: str = "demo"  # secfed.tasks.citysafety data scale and model size
    rounds: int = 20
    schedule: tuple[str, ...] = SCHEDULE
    epsilon: float = 8.0
    trainable: str = "head"  # secfed.models.TRAINABLE_SCOPES
    # one local epoch per round at the smallest site's expected batch of ~100 (Poisson q)
    sample_rate: float = 0.05
    local_steps: int = 20
    optimizer: str = "adam"
    learning_rate: float = 0.01
    lr_schedule: str = "cosine"
    max_grad_norm: float = 1.0
    clip_bound: float = 64.0  # L2 bound on a site's round update
    timeout_s: float = 540.0


@dataclass
class DemoResult:
    out: Path
    rounds: dict[int, dict[str, dict[str, Any]]] = field(default_factory=dict)
    coordinator_rounds: list[dict[str, Any]] = field(default_factory=list)
    report: Path | None = None
    seconds: float = 0.0
    status_url: str | None = None
    serving: bool = False  # the coordinator finished and stays up (--keep-serving)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _secfed(*args: str) -> list[str]:
    return [sys.executable, "-m", "secfed.cli.main", *args]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               HF_HUB_DISABLE_PROGRESS_BARS="1")  # the demo prints its own progress
    return env


def _build_once(done: Path, folder: Path, build: Callable[[], object],
                say: Callable[[str], None], built: str) -> None:
    """``build()`` unless ``done`` exists: a folder left half-built by an interrupted run is
    removed first, and ``built`` is said with the time it took."""
    if done.exists():
        return
    shutil.rmtree(folder, ignore_errors=True)
    t = time.monotonic()
    build()
    say(f"{built} ({time.monotonic() - t:.1f} s)")


def _prepare(out: Path, settings: DemoSettings, say: Callable[[str], None]) -> tuple[Path, Path]:
    from secfed.tasks.citysafety import generate_federation, prepare_demo_model

    data, model = out / "data", out / "model"

    def generate() -> None:
        with progress.task("demo: generating the city-safety data"):
            generate_federation(data, seed=settings.seed, scale=settings.scale)

    def build() -> None:
        with progress.task("demo: building the model (image tower pre-training)"):
            prepare_demo_model(model, seed=settings.seed, size=settings.scale,
                               log=lambda m: say(f"model: {m}"))

    _build_once(data / "test", data, generate, say, f"data: generated under {data}")
    _build_once(model / "secfed_model.json", model, build, say, f"model: built under {model}")
    return data, model


def _prepare_instruction_task(out: Path, settings: DemoSettings, say: Callable[[str], None], *,
                              variant: str, vision: bool, make_model: Callable[..., object],
                              announce: str, name_base: bool = False) -> tuple[Path, Path]:
    """A generative variant's data and model under ``data-<variant>/`` and ``model-<variant>/``:
    instruction records (with camera frames when ``vision``) and the model directory that
    ``make_model(folder, seed=, size=, log=)`` builds, after saying ``announce``; with
    ``name_base``, the line saying it was built also names its base weights."""
    from secfed.tasks.citysafety import generate_instruction_federation

    data, built = out / f"data-{variant}", out / f"model-{variant}"
    model = built / "model"

    def build() -> None:
        say(announce)
        make_model(built, seed=settings.seed, size=settings.scale,
                   log=lambda m: say(f"model: {m}"))

    frames = " with camera frames" if vision else ""
    base = f", base weights in {built / 'base'}" if name_base else ""
    _build_once(data / "federation.json", data,
                lambda: generate_instruction_federation(data, seed=settings.seed,
                                                        scale=settings.scale, vision=vision),
                say, f"data: instruction records{frames} under {data}")
    _build_once(model / "secfed_model.json", built, build, say, f"model: built under {model}{base}")
    return data, model


def _prepare_generative(out: Path, settings: DemoSettings,
                        say: Callable[[str], None]) -> tuple[Path, Path]:
    """The generative task: instruction records per enterprise, and the small causal LM
    pre-trained here (no weights exist offline) turned into a LoRA model directory."""
    from secfed.tasks.citysafety.generative import prepare_generative_model

    return _prepare_instruction_task(
        out, settings, say, variant="generative", vision=False,
        make_model=prepare_generative_model, name_base=True,
        announce="model: pre-training a small causal LM on generated city-safety text (the "
                 "stand-in foundation model: no language-model weights exist offline)")


def _prepare_vision_language(out: Path, settings: DemoSettings,
                             say: Callable[[str], None]) -> tuple[Path, Path]:
    """The vision-language variant: records with their camera frames, and a LLaVA-style model
    assembled from the generative task's pre-trained causal LM (built first if missing) and a
    vision tower aligned on generic scenes."""
    from secfed.tasks.citysafety.vision_language import prepare_vision_language_model

    _, text_model = _prepare_generative(out, settings, say)
    return _prepare_instruction_task(
        out, settings, say, variant="vision-language", vision=True,
        make_model=partial(prepare_vision_language_model, lm_base=text_model.parent / "base"),
        announce="model: a LLaVA-style model from the pre-trained causal LM and a vision tower "
                 "aligned on generic scenes (the stand-in vision-language foundation model)")


def prepare_demo(out: str | Path, *, settings: DemoSettings | None = None,
                 say: Callable[[str], None] = print,
                 task: str = "classify", vision: bool = False) -> tuple[Path, Path]:
    """``secfed demo prepare``: generate the demo data and build (pre-train) the model once.

    ``task`` is ``"classify"`` (the image+text classifier of ``demo run``) or ``"generative"``
    (instruction records and a small pre-trained causal LM with LoRA, under
    ``data-generative/`` and ``model-generative/``); with ``vision``, its vision-language
    variant (records with camera frames and a LLaVA-style model, under
    ``data-vision-language/`` and ``model-vision-language/``). Returns ``(data_dir,
    model_dir)`` under ``out``; both are reused by a later run.

    Raises:
        ConfigError: an unknown ``task``, or ``vision`` without ``task="generative"``.
    """
    from secfed.errors import ConfigError

    if vision and task != "generative":
        raise ConfigError(f"vision must go with task generative (got task {task!r})")
    if task == "generative":
        prepare = _prepare_vision_language if vision else _prepare_generative
        return prepare(Path(out), settings or DemoSettings(), say)
    if task != "classify":
        raise ConfigError(f"task must be classify or generative (got {task!r})")
    return _prepare(Path(out), settings or DemoSettings(), say)


def _enterprise_dirs(data: Path) -> dict[str, Path]:
    from secfed.tasks.citysafety import ENTERPRISES

    return {p.name: data / p.name for p in ENTERPRISES}


def run_demo(out: str | Path, *, settings: DemoSettings | None = None,
             say: Callable[[str], None] = print, keep_serving: bool = False) -> DemoResult:
    """Run the demo federation under ``out``; returns per-round metrics and the report path.

    The coordinator serves its status page on a free loopback port (announced). With
    ``keep_serving`` it stays up after the last round, with the audit written, until Ctrl-C or
    SIGTERM stops the demo.

    Raises:
        SecfedError: a process failed or the federation did not finish in time.
    """
    settings = settings or DemoSettings()
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    data, model = _prepare(root, settings, say)
    sites = _enterprise_dirs(data)
    kits = root / "kits"
    logs = root / "logs"
    shutil.rmtree(kits, ignore_errors=True)
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir()
    port = _free_port()
    init = _secfed(
        "federation", "init", "--name", "city-safety-demo",
        *[a for eid in sites for a in ("--enterprise", eid)],
        "--coordinator-url", f"https://127.0.0.1:{port}", "--out", str(kits),
        "--mode-schedule", ",".join(settings.schedule), "--rounds", str(settings.rounds),
        "--model", str(model), "--epsilon", str(settings.epsilon),
        "--sample-rate", str(settings.sample_rate), "--local-steps", str(settings.local_steps),
        "--learning-rate", str(settings.learning_rate), "--optimizer", settings.optimizer,
        "--lr-schedule", settings.lr_schedule, "--trainable", settings.trainable,
        "--max-grad-norm", str(settings.max_grad_norm), "--clip-bound", str(settings.clip_bound),
        "--stage-deadline", "60",
        "--train-deadline", "300",
    )
    subprocess.run(init, check=True, env=_env(), stdout=subprocess.DEVNULL)
    sealed = (f"; the CKKS secret was sealed from {next(iter(sites))} to the others"
              if "ckks" in settings.schedule else "")
    say(f"kits: {kits}: enrolled (admin {kits / 'ca'} holds the CA key only; the coordinator and "
        f"{', '.join(sites)} each made their own keys{sealed}), coordinator on 127.0.0.1:{port}")
    say(f"sites train: {settings.trainable}; {settings.rounds} rounds of DP-SGD "
        f"({settings.optimizer}, q={settings.sample_rate:g}, {settings.local_steps} steps per "
        f"round), budget eps={settings.epsilon:g} per enterprise")
    if settings.trainable in FEATURE_SCOPES:
        say("sites: loading their data and computing tower features once (a minute or two)")

    procs: dict[str, subprocess.Popen] = {}
    files: dict[str, IO[bytes]] = {}
    try:
        files["coordinator"] = open(logs / "coordinator.jsonl", "wb")
        procs["coordinator"] = subprocess.Popen(
            _secfed("aggregate", "--kit", str(kits / "coordinator"), "--json",
                    "--status-listen", "127.0.0.1:0",
                    *(["--keep-serving"] if keep_serving else [])),
            stdout=files["coordinator"], stderr=subprocess.STDOUT, env=_env(),
        )
        for eid, site_data in sites.items():
            files[eid] = open(logs / f"{eid}.jsonl", "wb")
            procs[eid] = subprocess.Popen(
                _secfed("join", "--kit", str(kits / eid), "--model", str(model), "--data",
                        str(site_data), "--test-data", str(data / "test"), "--json",
                        "--new-ledger"),  # the demo's sites are brand new
                stdout=files[eid], stderr=subprocess.STDOUT, env=_env(),
            )
        result = _follow(root, procs, settings, say)
        if keep_serving:
            _finish(result, root, kits, sites, started, say)
            say(f"status page: {result.status_url} stays up (--keep-serving)")
            say("Ctrl-C or SIGTERM stops the coordinator")
            _wait_for_stop(procs["coordinator"])
            return result
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
        for f in files.values():
            f.close()
    _finish(result, root, kits, sites, started, say)
    return result


def _finish(result: DemoResult, root: Path, kits: Path, sites: dict[str, Path], started: float,
            say: Callable[[str], None]) -> None:
    result.report = _audit(root, kits, sites, say)
    result.seconds = time.monotonic() - started
    _print_summary(result, sites, say)


def _wait_for_stop(coordinator: subprocess.Popen) -> None:
    """Wait until the coordinator ends, or Ctrl-C / SIGTERM reaches the demo (then the caller
    stops it)."""
    def interrupted(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupted)
    try:
        coordinator.wait()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)


def _read_events(path: Path, offset: int) -> tuple[list[dict[str, Any]], int]:
    with open(path, "rb") as fh:
        fh.seek(offset)
        chunk = fh.read()
    end = chunk.rfind(b"\n") + 1
    events = []
    for line in chunk[:end].splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            continue  # a warning printed by a library, not an event
    return events, offset + end


def _follow(root: Path, procs: dict[str, subprocess.Popen], settings: DemoSettings,
            say: Callable[[str], None]) -> DemoResult:
    with progress.task("demo: sites ready (data, model, features)",
                       total=len(procs) - 1) as ready, \
            progress.task("demo: rounds", total=settings.rounds) as rounds:
        return _follow_events(root, procs, settings, say, ready, rounds)


def _follow_events(root: Path, procs: dict[str, subprocess.Popen], settings: DemoSettings,
                   say: Callable[[str], None], ready: progress.Task,
                   rounds: progress.Task) -> DemoResult:
    result = DemoResult(root)
    offsets = {name: 0 for name in procs}
    started: set[str] = set()
    deadline = time.monotonic() + settings.timeout_s
    while True:
        for name in procs:
            events, offsets[name] = _read_events(root / "logs" / f"{name}.jsonl", offsets[name])
            for e in events:
                _show(name, e, result, say)
                if name != "coordinator" and name not in started:  # its first event: ready
                    started.add(name)
                    ready.advance()
                if name == "coordinator" and e.get("event") in ("round_done", "round_aborted"):
                    rounds.advance()
        running = [n for n, p in procs.items() if p.poll() is None]
        failed = [n for n, p in procs.items() if p.poll() not in (None, 0)]
        if failed:
            raise SecfedError(f"demo process(es) {failed} failed; see {root / 'logs'}")
        if not running or (running == ["coordinator"] and result.serving):
            return result
        if time.monotonic() > deadline:
            raise SecfedError(f"demo must finish within {settings.timeout_s:.0f} s (timed out)")
        time.sleep(0.5)


def _show(name: str, e: dict[str, Any], result: DemoResult, say: Callable[[str], None]) -> None:
    kind = e.get("event")
    if name == "coordinator":
        if kind == "status_listening":
            result.status_url = e["url"]
            say(f"status page: {e['url']} (live; metrics at {e['metrics']})")
        elif kind == "serving_until_stopped":
            result.serving = True
        elif kind == "round_opened":
            say(f"round {e['round']}: opened ({e['mode']}, threshold {e['threshold']})")
        elif kind == "stage_closed":
            say(f"round {e['round']}: stage {e['stage']} closed ({e['received']} messages)")
        elif kind in ("round_done", "round_aborted"):
            result.coordinator_rounds.append(e)
            say(f"round {e['round']}: {kind.split('_')[1]}"
                + (f" -- {e['reason']}" if kind == "round_aborted" else ""))
        return
    if kind == "training":
        say(f"  {name}: training round {e['round']} with DP-SGD")
    elif kind == "round_report":
        metrics = e.get("metrics") or {}
        result.rounds.setdefault(e["round"], {})[name] = {
            "status": e["status"], "epsilon": e.get("epsilon"),
            "accuracy": metrics.get("accuracy"), "mode": e.get("mode"),
        }
        acc = metrics.get("accuracy")
        acc_s = f"{acc:.3f}" if isinstance(acc, float) else "-"
        eps = e.get("epsilon")
        eps_s = f"{eps:.3f}" if isinstance(eps, float) else "-"
        say(f"  {name}: round {e['round']} {e['status']}, accuracy {acc_s}, epsilon {eps_s}")


def _audit(root: Path, kits: Path, sites: dict[str, Path], say: Callable[[str], None]) -> Path | None:
    out = root / "report"
    args = ["audit", "--transcript", str(kits / "coordinator" / "state.sqlite"),
            "--federation", str(kits / "coordinator" / "federation.toml"), "--out", str(out)]
    for eid in sites:
        args += ["--ledger", str(kits / eid / "ledger.sqlite"),
                 "--outbound", f"{eid}={kits / eid / 'state.sqlite'}"]
    proc = subprocess.run(_secfed(*args), env=_env(), capture_output=True, text=True)
    say(f"audit: exit {proc.returncode}; report under {out}")
    if proc.returncode not in (0, 1):
        say(proc.stderr.strip()[-2000:])
        return None
    return out


def _print_summary(result: DemoResult, sites: dict[str, Path], say: Callable[[str], None]) -> None:
    say("")
    say("accuracy on the shared held-out set / epsilon spent (PRV), per enterprise and round")
    say("round mode    " + " ".join(f"{eid[:20]:>20}" for eid in sites))
    for r in sorted(result.rounds):
        row = result.rounds[r]
        mode = next((v["mode"] for v in row.values() if v.get("mode")), "?")
        cells = []
        for eid in sites:
            v = row.get(eid, {})
            acc, eps = v.get("accuracy"), v.get("epsilon")
            acc_s = f"{acc:.3f}" if isinstance(acc, float) else str(v.get("status", "-"))
            eps_s = f"{eps:.2f}" if isinstance(eps, float) else "-"
            cells.append(f"{acc_s} / {eps_s}")
        say(f"{r:>5} {mode:<7} " + " ".join(f"{c:>20}" for c in cells))
    if result.report:
        say(f"audit report: {result.report / 'report.html'}")
    say(f"total {result.seconds:.0f} s; everything is under {result.out}")
