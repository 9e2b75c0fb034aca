"""Verified norm probes and contribution shares (issue 17): exclusion, accuracy, cost.

Everything runs the real state machines in-process (:func:`secfed.protocol.simulate`), with
updates from :func:`secfed.protocol.simulate.role_updates` (honest at the clip bound, free riders
sending only the noise part, attackers at S x the bound against the honest direction).

1. **exclusion**: ``--trials`` rounds of n = 10 (9 honest at 0.999 x the bound, 1 attacker at
   ``--attack-scale`` x), fresh probes each round: how often the attacker is excluded, how many
   honest updates are (target: 200 of 200, at most 1).
2. **shares**: n = 10, d = ``--dim`` with 2 free riders: the largest |protocol share - share
   computed in the clear| (target 1e-6) and the free riders' shares (target <= 0.02).
3. **cost**: one secagg round of n = ``--cost-n`` (10) at d = ``--cost-dim`` with probes off
   and on, in the same run, alternating; medians of the critical-path compute (each stage's
   mean participant time plus the coordinator's) and of the CPU seconds of all parties
   together, and the ratios. The figure over the real transport is bench/round_overhead.py's.

    .venv/bin/python bench/probes.py [--trials 200] [--dim 100000] [--cost-dim 1000000]
                                     [--cost-n 10] [--parts exclusion,shares,cost]
"""

from __future__ import annotations

import argparse
import math
import os
import secrets
import statistics
import time

import numpy as np

from secfed.protocol.probes import DEFAULT_PROBE_MARGIN, norm_estimate, probe_products
from secfed.protocol.simulate import plaintext_contributions, role_updates, simulate


def exclusion(trials: int, *, n: int, d: int, scale: float, mode: str) -> tuple[int, int, int]:
    """(attacker excluded count, honest excluded count, honest updates seen)."""
    caught = honest_out = 0
    for t in range(trials):
        updates, roles = role_updates(n, d, attackers=1, attack_scale=scale, seed=t)
        res = simulate(updates, mode=mode, probes=32, clip_bound=1.0)
        assert res.probes is not None
        ids = [f"enterprise-{i:04d}" for i in range(n)]
        excluded = set(res.probes.excluded)
        caught += ids[n - 1] in excluded
        honest_out += sum(1 for i in range(n - 1) if ids[i] in excluded)
    return caught, honest_out, trials * (n - 1)


def exclusion_estimates(trials: int, *, n: int, d: int, scale: float) -> tuple[int, int, int, float, float]:
    """The same decision at the estimator level, for larger d: the protocol's probe terms are
    exactly ``<enc(u_i), v_j>`` (``test_probe_products_are_exact_ring_inner_products``), so each
    update is encoded, probed with a fresh seed and compared with margin x bound (bound 1).
    Returns (attacker excluded, honest excluded, honest seen, largest honest estimate,
    smallest attacker estimate)."""
    scale_bits = 24
    limit = DEFAULT_PROBE_MARGIN * 1.0
    caught = honest_out = 0
    worst_honest, best_attacker = 0.0, math.inf
    for t in range(trials):
        updates, _ = role_updates(n, d, attackers=1, attack_scale=scale, seed=t)
        words = [np.rint(u.astype(np.float64) * 2.0**scale_bits).astype(np.int64).astype(np.uint64)
                 for u in updates]
        products = probe_products(words, seed=secrets.token_bytes(32), k=32, ring_bits=64, length=d)
        est = [norm_estimate(p, ring_bits=64, scale_bits=scale_bits) for p in products]
        caught += est[-1] > limit
        honest_out += sum(e > limit for e in est[:-1])
        worst_honest = max(worst_honest, *est[:-1])
        best_attacker = min(best_attacker, est[-1])
    return caught, honest_out, trials * (n - 1), worst_honest, best_attacker


def shares(*, n: int, d: int, free_riders: int) -> tuple[float, list[float], float]:
    updates, roles = role_updates(n, d, free_riders=free_riders, seed=1)
    res = simulate(updates, probes=32, clip_bound=1.0)
    assert res.probes is not None
    plain = plaintext_contributions(updates, res.survivors)
    ids = [f"enterprise-{i:04d}" for i in range(n)]
    err = max(abs(res.probes.contributions[ids[i]] - plain[i]) for i in res.survivors)
    riders = [res.probes.contributions[ids[i]] for i, r in enumerate(roles) if r == "free-rider"]
    return err, riders, sum(res.probes.contributions.values())


def _compute_seconds(timings: dict[str, float]) -> float:
    """Critical-path compute of a round in-process: each stage's mean participant time plus
    the coordinator's close and receive times (network excluded)."""
    return sum(v for k, v in timings.items() if k.startswith(("participant_", "coordinator_close_",
                                                             "coordinator_receive_"))
               and k not in ("participant_protect",))


def cost(*, n: int, d: int, repeats: int) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """Medians over ``repeats`` alternating pairs, probes off then on: ``compute`` (the critical
    path's stage timings, :func:`_compute_seconds`) and ``cpu`` (CPU seconds of the whole
    in-process round, every party together: steadier than wall time on a loaded machine).
    Returns (off, on, the last probed round's stage timings)."""
    updates, _ = role_updates(n, d, seed=2)
    simulate(updates, probes=32, clip_bound=1.0)  # warm-up: imports, first allocations
    runs: dict[int, list[tuple[float, float]]] = {0: [], 32: []}
    last: dict[str, float] = {}
    for _ in range(repeats):
        for k in (0, 32):
            started = time.process_time()
            res = simulate(updates, probes=k, clip_bound=1.0)
            runs[k].append((_compute_seconds(dict(res.timings)), time.process_time() - started))
            if k:
                last = dict(res.timings)
    med = {k: {"compute": statistics.median(c for c, _ in v), "cpu": statistics.median(u for _, u in v)}
           for k, v in runs.items()}
    return med[0], med[32], last


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--trial-dim", type=int, default=10_000)
    ap.add_argument("--attack-scale", type=float, default=10.0)
    ap.add_argument("--dim", type=int, default=100_000)
    ap.add_argument("--cost-dim", type=int, default=1_000_000)
    ap.add_argument("--cost-n", type=int, default=10, help="enterprises in the cost rounds")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--mode", default="secagg", choices=("secagg", "secagg+"))
    ap.add_argument("--estimator-dim", type=int, default=0,
                    help="also measure exclusion at the estimator level at this d (see "
                         "exclusion_estimates); 0 = skip")
    ap.add_argument("--parts", default="exclusion,shares,cost",
                    help="comma-separated subset of exclusion, shares, cost")
    args = ap.parse_args()
    parts = set(args.parts.split(","))

    if "exclusion" in parts:
        caught, honest_out, honest_seen = exclusion(
            args.trials, n=10, d=args.trial_dim, scale=args.attack_scale, mode=args.mode
        )
        print(f"exclusion ({args.mode}, n=10, d={args.trial_dim}, k=32, margin 1.5):")
        print(f"  attacker at {args.attack_scale:g}x the bound excluded in {caught} of {args.trials} rounds")
        print(f"  honest updates at 0.999x the bound excluded: {honest_out} of {honest_seen}")
    if "exclusion" in parts and args.estimator_dim:
        caught, honest_out, honest_seen, worst, best = exclusion_estimates(
            args.trials, n=10, d=args.estimator_dim, scale=args.attack_scale)
        print(f"exclusion, estimator level (n=10, d={args.estimator_dim}, k=32, margin 1.5):")
        print(f"  attacker at {args.attack_scale:g}x excluded in {caught} of {args.trials}; honest "
              f"excluded {honest_out} of {honest_seen}; largest honest estimate {worst:.3f}, "
              f"smallest attacker estimate {best:.3f} (limit 1.5)")
    if "shares" in parts:
        err, riders, total = shares(n=10, d=args.dim, free_riders=2)
        print(f"shares (secagg, n=10, d={args.dim}, 2 free riders):")
        print(f"  max |protocol - plaintext| = {err:.3e}   sum of shares = {total:.12f}")
        print(f"  free riders' shares: {', '.join(f'{r:.5f}' for r in riders)}")
    if "cost" not in parts:
        return

    off, on, timings = cost(n=args.cost_n, d=args.cost_dim, repeats=args.repeats)
    print(f"cost (secagg, n={args.cost_n}, d={args.cost_dim}, in-process compute, median of "
          f"{args.repeats}, load average {os.getloadavg()[0]:.1f}):")
    for what in ("compute", "cpu"):
        a, b = off[what], on[what]
        print(f"  {what:<8} probes off {a:.3f} s   probes on {b:.3f} s   extra {b - a:.3f} s "
              f"= {100 * (b - a) / a:.0f} % of the round without probes")
    for name in ("participant_probe", "coordinator_close_probe", "participant_contribute",
                 "coordinator_close_contribute", "coordinator_close_unmask"):
        if name in timings:
            print(f"    {name:<32} {timings[name]:.3f} s")


if __name__ == "__main__":
    main()
