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
for both), bytes per enterprise per round (message payloads, both ways), secfed's
max |sum - plaintext sum|, and the ratio Flower / secfed measured in this run. Then the curve of
secfed's coordinator CPU over n against n log n and n^2. No timed asserts.

    flock /tmp/secfed-suite.lock .venv/bin/python bench/flower_scale.py [--n 10,100,1000]
        [--dim 100000] [--drop 0.1] [--timeout 3600] [--out bench/results/flower_scale.md]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def _one(kind: str, n: int, dim: int, drop: float) -> dict[str, Any]:
    dropped = set(range(n - math.floor(drop * n), n))
    if kind == "secfed":
        from secfed.flower.simulate import simulate

        return simulate(enterprises=n, dim=dim, mode="secagg+", rounds=1, drop=drop)
    from secfed.flower.baseline import run_flower_secaggplus

    return run_flower_secaggplus(enterprises=n, dim=dim, rounds=1, dropped=dropped)


def _run(kind: str, n: int, dim: int, drop: float, timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--one", kind, "--n", str(n), "--dim", str(dim),
           "--drop", str(drop)]
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s"}
    wall = time.perf_counter() - start
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["?"])[-1][:300]}
    out = json.loads(done.stdout.strip().splitlines()[-1])
    out["process_s"] = round(wall, 1)
    return out


def _fmt(x: Any, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", default="10,100,1000")
    ap.add_argument("--dim", type=int, default=100_000)
    ap.add_argument("--drop", type=float, default=0.1)
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--skip-flower-above", type=int, default=10**9,
                    help="do not run Flower's workflow for n above this (report it as skipped)")
    ap.add_argument("--one", choices=("secfed", "flower"))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    ns = [int(x) for x in args.n.split(",")]
    if args.one:
        print(json.dumps(_one(args.one, ns[0], args.dim, args.drop)))
        return
    rows = []
    for n in ns:
        ours = _run("secfed", n, args.dim, args.drop, args.timeout)
        theirs = (_run("flower", n, args.dim, args.drop, args.timeout)
                  if n <= args.skip_flower_above else {"error": "skipped"})
        rows.append((n, ours, theirs))
        print(f"n={n}: secfed {json.dumps(ours)}\n       flower {json.dumps(theirs)}", flush=True)
    lines = [f"# secfed SecAgg+ on Flower's simulation engine vs Flower SecAgg+ "
             f"(d={args.dim}, {args.drop:.0%} dropped after upload, 1 round)", "",
             "| n | secfed round s | Flower round s | Flower/secfed | secfed coord CPU s | "
             "Flower coord CPU s | Flower/secfed CPU | secfed bytes/ent | Flower bytes/ent | "
             "secfed max err | survivors |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for n, o, t in rows:
        rs = o.get("round_s", [None])[0]
        ft = t.get("round_s", [None])[0]
        oc, fc = o.get("coordinator_cpu_s"), t.get("coordinator_cpu_s")
        ratio = f"{ft / rs:.1f}x" if rs and ft else t.get("error", "-")
        cratio = f"{fc / oc:.1f}x" if oc and fc else "-"
        lines.append(
            f"| {n} | {_fmt(rs)} | {_fmt(ft)} | {ratio} | {_fmt(oc)} | {_fmt(fc)} | {cratio} | "
            f"{_fmt(o.get('bytes_per_enterprise'), ',')} | {_fmt(t.get('bytes_per_enterprise'), ',')} | "
            f"{_fmt(o.get('max_abs_error'), '.2e')} | {o.get('survivors', o.get('error'))} |")
    pts = [(n, o["coordinator_cpu_s"]) for n, o, _ in rows if o.get("coordinator_cpu_s")]
    lines += ["", "secfed coordinator CPU over n (ratio to n log2 n and to n^2, first point = 1):"]
    if pts:
        n0, c0 = pts[0]
        for n, c in pts:
            nlogn = (n * math.log2(n)) / (n0 * math.log2(n0))
            lines.append(f"- n={n}: {c:.2f} s; x{c / c0:.1f} vs n log n x{nlogn:.1f}, "
                         f"n^2 x{(n / n0) ** 2:.0f}")
        for (na, ca), (nb, cb) in zip(pts, pts[1:]):
            lines.append(f"- log-log slope {na}->{nb}: {math.log(cb / ca) / math.log(nb / na):.2f} "
                         "(1 = linear, 2 = quadratic)")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
