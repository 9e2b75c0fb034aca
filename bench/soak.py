"""Soak: N enterprises x R rounds at dimension d over mutual TLS with random dropouts (issue 19
item 5).

A real coordinator (``secfed aggregate``) and N site processes. Each site runs secfed's own
participant loop (:meth:`secfed.participant.Participant.run`, what ``secfed join`` runs: kit,
policy, ledger charged before the upload, HTTPS client, catch-up) with a synthetic update. In each
round every site independently drops out with probability ``--drop``: it uploads its masked
update and then goes silent for the rest of the round (the hardest dropout: the survivors must
remove its masks), and catches up from the stored aggregate before its next round. The schedule
alternates secagg+ and secagg.

Prints, as one JSON object: rounds done/aborted, seconds per round, dropouts, each process's
resident memory (VmRSS) once round ``--warmup`` finished and at the end, the largest growth of
the coordinator and of the sites, ledger entries lost (an update that left its site without a
charge, or whose charge was released) or doubled (a round charged twice; a release that
withdraws an aborted round's charge before its update left is counted apart), the largest
deviation of any site's adapter from the plaintext FedAvg of the finished rounds, and
``secfed audit``'s verdict over every ledger, the transcript, federation.toml and the outbound
logs. The resident-memory series is written to ``rss.jsonl`` under the run's root.

    .venv/bin/python bench/soak.py [--sites 20] [--rounds 200] [--dim 10000] [--drop 0.02]
                                   [--warmup 20] [--root DIR]

Dropout draws use ``random`` seeded per site: nothing secret depends on them.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "OMP_NUM_THREADS": "1"}
TRAIN_S, STAGE_S, APPLIED_S = 30.0, 10.0, 10.0  # the federation's deadlines


def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_kib(pid: int) -> int:
    """Resident memory of ``pid`` in KiB (0 once it exited)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    found = re.search(r"VmRSS:\s+(\d+)", text)
    return int(found.group(1)) if found else 0


def make_kits(root: Path, *, sites: int, rounds: int, dim: int) -> Any:
    from secfed.config import Deadlines, DPSettings
    from secfed.federation.kits import create_kits
    from secfed.federation.plan import model_settings_for

    return create_kits(
        root, name="soak", enterprises=[f"site-{i:02d}" for i in range(sites)],
        coordinator_url=f"https://127.0.0.1:{_port()}",
        model=model_settings_for(model_dir=None, synthetic_dim=dim),
        mode_schedule=("secagg+", "secagg"), rounds=rounds,
        deadlines=Deadlines(train=TRAIN_S, stage=STAGE_S, applied=APPLIED_S),
        # small per-round charges, so 200 rounds stay within the sites' default budget
        dp=DPSettings(noise_multiplier=2.0, sample_rate=0.001, local_steps=1),
    )


def site_main(kit_dir: Path, drop: float, seed: int) -> None:
    """One site process: the participant loop; in a dropout round it goes silent after its upload."""
    from secfed.errors import TransportError
    from secfed.federation.kits import EnterpriseKit
    from secfed.participant import Participant
    from secfed.participant.adapter import SyntheticSite

    kit = EnterpriseKit.load(kit_dir)
    draw = random.Random(f"{seed}/{kit.enterprise_id}")  # nosec B311 # dropout draws, no secret
    site = SyntheticSite(kit.root, kit.enterprise_id, kit.federation.model)

    def show(event: dict[str, Any]) -> None:
        if event["event"] in ("round_report", "round_aborted", "caught_up", "federation_finished"):
            print(json.dumps(event, sort_keys=True, default=str), flush=True)

    participant = Participant(kit, site, events=show, new_ledger=True)
    client = participant.client
    exchange = client.exchange

    def upload_then_vanish(envelope: Any, **kw: Any) -> bytes | None:
        if envelope.stage == "upload" and draw.random() < drop:
            client.submit(envelope, until=kw.get("until"))
            print(json.dumps({"event": "soak_dropout", "round": envelope.round_number}),
                  flush=True)
            raise TransportError("soak: this site drops out after its upload")
        return exchange(envelope, **kw)

    client.exchange = upload_then_vanish  # type: ignore[method-assign]
    try:
        participant.run()
    finally:
        participant.close()


def _finished_rounds(db_path: Path) -> int:
    """Rounds no longer open in the coordinator's state (0 before it has one)."""
    try:
        with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5.0) as db:
            row = db.execute("SELECT COUNT(*) FROM rounds WHERE status != 'open'").fetchone()
    except sqlite3.Error:
        return 0
    return int(row[0])


def soak(root: Path, *, sites: int, rounds: int, dim: int, drop: float, warmup: int,
         seed: int = 0, timeout: float = 4 * 3600, max_seconds: float | None = None,
         tracemalloc: bool = False) -> dict[str, Any]:
    """Run the soak under ``root``; the figures (see the module docstring).

    ``max_seconds``: stop every process (SIGTERM) after this long and report what ran (the
    figures then cover the rounds that finished; ``stopped_early`` says so). ``tracemalloc``:
    the coordinator traces its allocations (``SECFED_TRACEMALLOC``) and dumps the top sites to
    ``root/tracemalloc/`` once ``warmup`` rounds finished (the baseline), every ``warmup``
    rounds after, and at its end."""
    kits = make_kits(root / "fed", sites=sites, rounds=rounds, dim=dim)
    py = [sys.executable, "-m", "secfed.cli.main"]
    logs: dict[str, Any] = {}
    procs: dict[str, subprocess.Popen] = {}
    logs["coordinator"] = open(root / "coordinator.jsonl", "wb")  # noqa: SIM115 -- closed below
    coordinator_env = {**ENV, "SECFED_TRACEMALLOC": str(root / "tracemalloc")} if tracemalloc else ENV
    procs["coordinator"] = subprocess.Popen(
        [*py, "aggregate", "--kit", str(kits.coordinator), "--json"],
        stdout=logs["coordinator"], stderr=subprocess.STDOUT, env=coordinator_env)
    for eid, kit_dir in kits.enterprises.items():
        logs[eid] = open(root / f"{eid}.jsonl", "wb")  # noqa: SIM115 -- closed below
        procs[eid] = subprocess.Popen(
            [sys.executable, __file__, "site", "--kit", str(kit_dir), "--drop", str(drop),
             "--seed", str(seed)], stdout=logs[eid], stderr=subprocess.STDOUT, env=ENV)
    state = kits.coordinator / "state.sqlite"
    samples: list[tuple[int, dict[str, int]]] = []  # (rounds finished, rss per process)
    stop = threading.Event()

    def sample() -> None:
        dumped = 0  # rounds finished at the last allocation dump asked for
        while not stop.is_set():
            finished = _finished_rounds(state)
            samples.append((finished, {n: rss_kib(p.pid) for n, p in procs.items()}))
            if tracemalloc and finished >= max(warmup, 1) + dumped and finished < rounds:
                dumped = finished if not dumped else dumped + max(warmup, 1)
                if procs["coordinator"].poll() is None:
                    procs["coordinator"].send_signal(signal.SIGUSR1)
            stop.wait(1.0)

    sampler = threading.Thread(target=sample, daemon=True)
    start = time.monotonic()
    sampler.start()
    stopped_early = False
    try:
        limit = timeout if max_seconds is None else min(timeout, max_seconds)
        while any(p.poll() is None for p in procs.values()):
            if time.monotonic() - start > limit:
                stopped_early = True
                for p in procs.values():
                    if p.poll() is None:
                        p.terminate()
                for p in procs.values():
                    p.wait(timeout=60)
                break
            time.sleep(1.0)
        codes = {n: p.returncode for n, p in procs.items()}
    finally:
        stop.set()
        sampler.join()
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
        for handle in logs.values():
            handle.close()
    elapsed = time.monotonic() - start
    ran = _finished_rounds(state) if stopped_early else rounds
    with open(root / "rss.jsonl", "w") as fh:  # (rounds finished, VmRSS KiB per process)
        for done, rss in samples:
            fh.write(json.dumps({"rounds_finished": done, "rss_kib": rss}) + "\n")
    return {**_figures(kits, samples, warmup=warmup, rounds=ran, dim=dim),
            "exit_codes": codes, "sites": sites, "dim": dim, "drop": drop,
            "rounds_planned": rounds, "stopped_early": stopped_early,
            "seconds": round(elapsed, 1), "seconds_per_round": round(elapsed / max(ran, 1), 2),
            "audit": audit(kits, root / "audit")}


def _growth(samples: list[tuple[int, dict[str, int]]], warmup: int, rounds: int
            ) -> dict[str, tuple[int, int, float]]:
    """Per process: (RSS once ``warmup`` rounds finished, RSS at the last sample while it was
    alive with all rounds finished or its last one, growth)."""
    warm = next((rss for finished, rss in samples if finished >= warmup), None)
    if warm is None:
        return {}
    out = {}
    for name, base in warm.items():
        alive = [rss[name] for finished, rss in samples if rss.get(name)]
        end = alive[-1] if alive else 0
        out[name] = (base, end, round(end / base - 1.0, 4) if base else 0.0)
    return out


def _figures(kits: Any, samples: list[tuple[int, dict[str, int]]], *, warmup: int, rounds: int,
             dim: int) -> dict[str, Any]:
    from secfed.participant.adapter import synthetic_update
    from secfed.privacy import read_ledger

    with sqlite3.connect(kits.coordinator / "state.sqlite") as db:
        rows = db.execute("SELECT round, status, survivors FROM rounds ORDER BY round").fetchall()
    status = {r: st for r, st, _ in rows}
    finished = [(r, tuple(json.loads(s))) for r, st, s in rows if st == "done"]
    want: dict[int, np.ndarray] = {0: np.zeros(dim, np.float64)}  # FedAvg after round r
    total = np.zeros(dim, np.float64)
    for r, survivors in finished:
        total = total + np.mean(
            [synthetic_update(e, r, dim).astype(np.float64) for e in survivors], 0)
        want[r] = total
    # a run stopped early: the round in its confirmation stage (sum known) may be applied
    flight = None
    for r, st, s in rows:
        if st == "open" and s:
            flight = np.mean([synthetic_update(e, r, dim).astype(np.float64)
                              for e in json.loads(s)], 0)
    lost = doubled = behind = charges = releases = 0
    worst = 0.0
    dropouts = 0
    for eid, kit_dir in kits.enterprises.items():
        # a charge is a DP-SGD entry; a release withdraws the charge of a round that aborted
        # before the site's update left it (same round number, not a second charge)
        kinds = [(e.round_number, json.loads(e.event_json).get("kind"))
                 for e in read_ledger(kit_dir / "ledger.sqlite")]
        charged = [r for r, kind in kinds if kind != "charge_release"]
        released = {r for r, kind in kinds if kind == "charge_release"}
        with sqlite3.connect(kit_dir / "state.sqlite") as st:
            # rounds whose update left the site (its outbound row is written before the send)
            sent = {r for (r,) in st.execute(
                "SELECT DISTINCT round FROM outbound WHERE stage = 'upload'")}
            applied = {r for (r,) in st.execute(
                "SELECT round FROM rounds WHERE status IN ('done','caught-up')")}
        charges, releases = charges + len(charged), releases + len(released)
        doubled += len(charged) - len(set(charged))
        lost += len(sent - set(charged)) + len(sent & released)
        path = kit_dir / "adapter.f32"  # absent until the site applied a round (zeros)
        adapter = (np.fromfile(path, dtype="<f4").astype(np.float64) if path.exists()
                   else np.zeros(dim))
        # a site that left the round in which the federation ended has no later round to
        # catch it up in: its adapter holds every finished round up to the last it applied
        upto = max((r for r in want if r <= max(applied, default=0)), default=0)
        behind += sum(1 for r, _ in finished if r > upto)
        error = float(np.abs(adapter - want[upto]).max())
        if flight is not None and upto == max(want):  # stopped early: it may have applied it
            error = min(error, float(np.abs(adapter - (want[upto] + flight)).max()))
        worst = max(worst, error)
        log = (kits.root.parent / f"{eid}.jsonl")
        dropouts += log.read_text(errors="replace").count('"soak_dropout"') if log.exists() else 0
    growth = _growth(samples, warmup, rounds)
    sites = {n: g for n, g in growth.items() if n != "coordinator"}
    return {
        "rounds": rounds, "done": sum(1 for s in status.values() if s == "done"),
        "aborted": sum(1 for s in status.values() if s == "aborted"),
        "other": sorted({s for s in status.values()} - {"done", "aborted"}),
        "last_round_done": status.get(rounds) == "done", "dropouts": dropouts,
        "ledger_entries_lost": lost, "ledger_entries_doubled": doubled,
        "ledger_charges": charges, "ledger_releases": releases,
        "max_adapter_error": worst, "site_rounds_behind_at_end": behind,
        "warmup_rounds": warmup,
        "coordinator_rss_kib": growth.get("coordinator", (0, 0, 0.0))[:2],
        "coordinator_growth": growth.get("coordinator", (0, 0, None))[2],
        "site_rss_kib_median": (int(np.median([g[0] for g in sites.values()])) if sites else 0,
                                int(np.median([g[1] for g in sites.values()])) if sites else 0),
        "site_growth_max": max((g[2] for g in sites.values()), default=None),
        "coordinator_rss_kib_by_round": _by_round(samples, "coordinator", rounds),
    }


def _by_round(samples: list[tuple[int, dict[str, int]]], name: str, rounds: int
              ) -> dict[int, int]:
    """``name``'s resident memory (KiB) when 1, 10, 20, 50, 100, ... rounds had finished: a
    plateau or a steady climb (the whole series is in ``rss.jsonl`` beside the logs)."""
    marks = sorted({1, 10, 20, *range(50, rounds + 1, 50), rounds})
    return {m: next((rss.get(name, 0) for done, rss in samples if done >= m), 0) for m in marks}


def audit(kits: Any, out: Path) -> dict[str, Any]:
    """``secfed audit`` over every ledger, the transcript, federation.toml and outbound logs."""
    cmd = [sys.executable, "-m", "secfed.cli.main", "audit", "--out", str(out), "--json",
           "--transcript", str(kits.coordinator / "state.sqlite"),
           "--federation", str(kits.coordinator / "federation.toml")]
    for kit_dir in kits.enterprises.values():
        cmd += ["--ledger", str(kit_dir / "ledger.sqlite"),
                "--outbound", str(kit_dir / "state.sqlite")]
    done = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=1800)
    verdict = None
    try:
        verdict = json.loads(done.stdout).get("verdict")
    except ValueError:
        pass
    return {"exit_code": done.returncode, "verdict": verdict,
            "stderr": done.stderr.strip()[-300:]}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "site":
        p = argparse.ArgumentParser()
        p.add_argument("site")
        p.add_argument("--kit", type=Path, required=True)
        p.add_argument("--drop", type=float, required=True)
        p.add_argument("--seed", type=int, default=0)
        a = p.parse_args()
        site_main(a.kit, a.drop, a.seed)
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sites", type=int, default=20)
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument("--dim", type=int, default=10_000)
    p.add_argument("--drop", type=float, default=0.02)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--root", type=Path, default=None, help="keep the run here (default: temp)")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="stop after this long and report the rounds that finished")
    p.add_argument("--tracemalloc", action="store_true",
                   help="coordinator allocation dumps under ROOT/tracemalloc/ (slower)")
    a = p.parse_args()
    run = dict(sites=a.sites, rounds=a.rounds, dim=a.dim, drop=a.drop, warmup=a.warmup,
               seed=a.seed, max_seconds=a.max_seconds, tracemalloc=a.tracemalloc)
    if a.root is not None:
        a.root.mkdir(parents=True, exist_ok=True)
        figures = soak(a.root, **run)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            figures = soak(Path(tmp), **run)
    print(json.dumps(figures, sort_keys=True))


if __name__ == "__main__":
    main()
