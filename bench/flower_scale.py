"""secfed's SecAgg+ on Flower's simulation engine vs Flower's own SecAgg+ workflow, same run.

For each n (default 10, 100, 1000 enterprises), d = 1e5, one SecAgg+ round with 10 % of the
sites dropped right after their upload, on the Ray simulation engine (one actor, as
``secfed.flower.client.SIMULATION_BACKEND``):

* **secfed on Flower**: ``secfed.flower.simulate.simulate`` -- secfed's coordinator as the
  ServerApp workflow, each site's participant (kit, policy, ledger charged before the upload)
  as the ClientApp;
* **Flower SecAgg+**: ``SecAggPlusWorkflow`` + ``secaggplus_mod`` with the same neighbourhood
  size (num_shares = k + 1) and threshold, the same synthetic updates, the same dropped sites.

Each run is its own process (Ray is initialised once per process). Printed per n: time per
round, the ServerApp process's CPU seconds (the coordinator plus Flower's engine driver, the same
for both), bytes per enterprise per round (message payloads, both ways), each side's
max |sum - plaintext sum| (Flower's: its mean times the count, its quantisation included), and
the ratio Flower / secfed measured in this run. Then the curve of secfed's coordinator CPU over
n against n log n and n^2. No timed asserts. A run cut at its timeout is killed with all it
started (Ray included) and its round time is printed as a lower bound (from the workflow's start,
Ray's start-up excluded), labelled so.

    flock /tmp/secfed-bench.lock nice -n 10 .venv/bin/python bench/flower_scale.py
        [--n 10,100,1000] [--dim 100000] [--drop 0.1] [--timeout 3600] [--flower-timeout S]
        [--out bench/results/flower_scale.md]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

STARTED = "flower-scale: workflow started at "  # a stderr line: the round's lower bound


def _one(kind: str, n: int, dim: int, drop: float, rounds: int = 1) -> dict[str, Any]:
    dropped = set(range(n - math.floor(drop * n), n))
    if kind == "secfed":
        from secfed.flower.simulate import simulate

        return simulate(enterprises=n, dim=dim, mode="secagg+", rounds=rounds, drop=drop)
    from secfed.flower.baseline import run_flower_secaggplus

    def started() -> None:
        print(f"{STARTED}{time.time():.3f}", file=sys.stderr, flush=True)

    return run_flower_secaggplus(enterprises=n, dim=dim, rounds=rounds, dropped=dropped,
                                 started=started)


def _kill_tree(pid: int) -> None:
    """The run's process and everything it started (Ray's raylet, GCS, workers), so a run cut at
    its timeout leaves nothing behind to skew the next one."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(procs, timeout=30)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)  # its own session: anything that escaped the tree


def _run(kind: str, n: int, dim: int, drop: float, timeout: float,
         rounds: int = 1) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--one", kind, "--n", str(n), "--dim", str(dim),
           "--drop", str(drop), "--rounds", str(rounds)]
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True,
                                start_new_session=True)
        try:
            stdout, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            killed_at = time.time()
            _kill_tree(proc.pid)
            proc.communicate()
            err.seek(0)
            marks = [float(line[len(STARTED):]) for line in err if line.startswith(STARTED)]
            return {"timeout_s": timeout,
                    "round_s_at_least": round(killed_at - marks[-1], 1) if marks else None,
                    "error": f"killed at the {timeout:.0f} s timeout, round not finished"}
        err.seek(0)
        stderr = err.read()
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        return {"error": (stderr.strip().splitlines() or ["?"])[-1][:300]}
    out = json.loads(stdout.strip().splitlines()[-1])
    out["process_s"] = round(wall, 1)
    return out


def _fmt(x: Any, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", default="10,100,1000")
    ap.add_argument("--dim", type=int, default=100_000)
    ap.add_argument("--drop", type=float, default=0.1)
    ap.add_argument("--rounds", type=int, default=1,
                    help="rounds per run; the table shows the mean round (secfed: over its "
                         "rounds, its node-identity step before round 1 left out; Flower: its "
                         "workflow's wall time / rounds)")
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--flower-timeout", type=float, default=None,
                    help="timeout of each Flower run (default --timeout); a run cut there is "
                         "reported as a lower bound on its round time")
    ap.add_argument("--skip-flower-above", type=int, default=10**9,
                    help="do not run Flower's workflow for n above this (report it as skipped)")
    ap.add_argument("--one", choices=("secfed", "flower"))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    ns = [int(x) for x in args.n.split(",")]
    if args.one:
        print(json.dumps(_one(args.one, ns[0], args.dim, args.drop, args.rounds)))
        return
    rows = []
    for n in ns:
        ours = _run("secfed", n, args.dim, args.drop, args.timeout, args.rounds)
        theirs = (_run("flower", n, args.dim, args.drop, args.flower_timeout or args.timeout,
                       args.rounds)
                  if n <= args.skip_flower_above else {"error": "skipped"})
        rows.append((n, ours, theirs))
        print(f"n={n}: secfed {json.dumps(ours)}\n       flower {json.dumps(theirs)}", flush=True)
        text = _table(rows, args)
        if args.out:  # after every n: a later n that dies still leaves the measured ones
            args.out.write_text(text + "\n")
    print(text)


def _round_cell(r: dict[str, Any]) -> tuple[str, float | None, bool]:
    """(cell, seconds, is a lower bound) of one run's round time (the mean over its rounds)."""
    if r.get("round_s"):
        mean = sum(r["round_s"]) / len(r["round_s"])
        return f"{mean:.2f}", mean, False
    if r.get("round_s_at_least") is not None:
        return f">= {r['round_s_at_least']:.0f} (killed at timeout)", r["round_s_at_least"], True
    return f"- ({r.get('error', '?')})", None, False


def _table(rows: list[tuple[int, dict[str, Any], dict[str, Any]]], args: Any) -> str:
    lines = [f"# secfed SecAgg+ on Flower's simulation engine vs Flower SecAgg+ "
             f"(d={args.dim}, {args.drop:.0%} dropped after upload, "
             f"{args.rounds} round{'s' if args.rounds > 1 else ''}: mean round)", "",
             f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on "
             f"{os.cpu_count()} cores (shared with other jobs), Ray simulation engine, one actor; "
             "each run its own process, per-run timeout "
             f"{args.timeout:.0f} s (Flower: {args.flower_timeout or args.timeout:.0f} s).", "",
             "| n | secfed round s | Flower round s | Flower/secfed | secfed coord CPU s | "
             "secfed coordinator threads CPU s | "
             "Flower coord CPU s | Flower/secfed CPU | secfed bytes/ent | Flower bytes/ent | "
             "secfed max err | Flower max err | survivors (secfed) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for n, o, t in rows:
        ocell, rs, _ = _round_cell(o)
        fcell, ft, bound = _round_cell(t)
        oc, fc = o.get("coordinator_cpu_s"), t.get("coordinator_cpu_s")
        ratio = (f"{'>= ' if bound else ''}{ft / rs:.1f}x" if rs and ft else "-")
        cratio = f"{fc / oc:.1f}x" if oc and fc else "-"
        lines.append(
            f"| {n} | {ocell} | {fcell} | {ratio} | {_fmt(oc)} | "
            f"{_fmt(o.get('coordinator_threads_cpu_s'))} | {_fmt(fc)} | {cratio} | "
            f"{_fmt(o.get('bytes_per_enterprise'), ',')} | {_fmt(t.get('bytes_per_enterprise'), ',')} | "
            f"{_fmt(o.get('max_abs_error'), '.2e')} | {_fmt(t.get('max_abs_error'), '.2e')} | "
            f"{o.get('survivors', o.get('error'))} |")
    lines += _curve(rows, "coordinator_cpu_s", "secfed's ServerApp process CPU (Flower's engine "
                    "threads included)")
    lines += _curve(rows, "coordinator_threads_cpu_s", "secfed's own coordinator threads' CPU "
                    "(workflow, coordinator loop and its workers; no engine threads)")
    return "\n".join(lines)


def _curve(rows: list[tuple[int, dict[str, Any], dict[str, Any]]], key: str, what: str) -> list[str]:
    """Growth of ``key`` over n from the first n, against n log2 n and n^2, and log-log slopes."""
    pts = [(n, o[key]) for n, o, _ in rows if o.get(key)]
    lines = ["", f"{what} over n (growth from the first n, against n log2 n and n^2):"]
    if pts:
        n0, c0 = pts[0]
        for n, c in pts:
            nlogn = (n * math.log2(n)) / (n0 * math.log2(n0))
            lines.append(f"- n={n}: {c:.2f} s; x{c / c0:.1f} (n log n: x{nlogn:.1f}, "
                         f"n^2: x{(n / n0) ** 2:.0f})")
        for (na, ca), (nb, cb) in zip(pts, pts[1:]):
            lines.append(f"- log-log slope {na}->{nb}: {math.log(cb / ca) / math.log(nb / na):.2f} "
                         "(1 = linear, 2 = quadratic)")
    return lines


if __name__ == "__main__":
    main()
