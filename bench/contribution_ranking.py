"""Contribution shares against leave-one-out utility (issue 17, target I; slow, not in the tests).

Five city-safety sites: the three enterprises of ``secfed.tasks.citysafety.generate_federation``
(energy utility, residential-community security operator, city operations centre), a **free
rider** and a site whose labels are 40 % flipped. Both extra sites hold records of their own:
the energy utility's and the residential operator's records of a second federation generated
from the next seed (the flipped site has the energy utility's profile and size; the free rider
holds the residential operator's records and never computes on them).

Every round each site runs DP-SGD on the city-safety head over precomputed tower features
(bench/utility.py's fast path and settings: ``dp_plan`` sigma for the target epsilon over all
rounds, ``train_local``); the free rider runs the same DP-SGD with every step an empty batch,
so its update is the DP noise alone passed through its optimizer (:class:`NoiseOnlyTrainer`).
The five updates go through the real SecAgg state machines with verified probes
(``secfed.protocol.simulate(..., probes=32)``), which give each survivor's share
``c_i = <u_i, U> / <U, U>``; the federation applies the secure sum (FedAvg). A site's
cumulative share is its mean share over the rounds (0 in a round it was excluded), as
``secfed contributions`` reports it.

Leave-one-out utility is computed in the clear: the held-out accuracy (and macro-F1) of the
FedAvg of the recorded DP updates of all five sites, minus that of the FedAvg of the same
updates without site i, replayed round by round from the same initial head. The same DP updates
rather than a retrained federation: the DP noise comes from the OS CSPRNG and cannot be drawn
again, so a retrained federation would differ by fresh noise as well as by the missing site.
Held-out set: ``generate_held_out`` from seed + 3000 (clean labels, every class alike).

Targets: the free rider's and the flipped site's cumulative shares are the two lowest, and the
Spearman correlation of the shares with leave-one-out accuracy is >= 0.8. ``--seeds N`` repeats
the run N times (seeds seed, seed+1, ...: the seed picks the flipped labels; every run draws
fresh DP noise and Poisson samples from the OS CSPRNG, as in production; the data stay the same)
and reports every run.

Also reported: each extra site's cumulative share against the honest site of the same profile
and size (the flipped site against the energy utility, the free rider against the residential
operator: the same sigma, q and local steps), since a share counts the site's own DP noise
energy ``||z_i||^2``, which grows with its local steps.

Writes ``bench/results/contribution_ranking.md`` (``--dp-optimizer sgd``:
``contribution_ranking_sgd.md``), rewritten after every run.

    .venv/bin/python bench/contribution_ranking.py [--seeds 3] [--scale demo] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent))

from utility import (  # noqa: E402
    Settings,
    _copy,
    cached_features,
    dp_config,
    dp_plan,
    ledger_epsilon,
    log,
    prepare_federation,
)

from secfed import progress  # noqa: E402
from secfed.models import adapter_layout, get_flat, set_flat  # noqa: E402
from secfed.models.features import FeatureDataset, feature_classifier  # noqa: E402
from secfed.models.scopes import select_trainable  # noqa: E402
from secfed.protocol.simulate import plaintext_contributions, simulate  # noqa: E402
from secfed.tasks.citysafety import generate_federation, generate_held_out  # noqa: E402
from secfed.tasks.citysafety.taxonomy import HAZARD_CLASSES  # noqa: E402
from secfed.training import PrivateTrainer, collate_examples, train_local  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
FREE_RIDER = "free_rider"
FLIPPED = "flipped_labels"
#: The second federation (data seed + 1) lends each extra site the records of one enterprise.
EXTRA_SOURCES = {FLIPPED: "energy_utility", FREE_RIDER: "residential_security"}
FLIP_FRACTION = 0.4  # the target: a site with 40 % flipped labels
HELD_OUT_SEED_OFFSET = 3000  # another seed than the federation's test set and utility.py's validation
SPEARMAN_TARGET = 0.8


# ----------------------------------------------------------------------------- pure pieces


def spearman(x, y) -> float:
    """Spearman rank correlation of two equal-length sequences (ties get their mean rank)."""
    return float(spearmanr(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64))[0])


def flip_labels(labels: torch.Tensor, *, fraction: float, n_classes: int,
                seed: int) -> torch.Tensor:
    """A copy of ``labels`` with exactly ``round(fraction * N)`` of them, chosen at random,
    moved to another class (uniform over the ``n_classes - 1`` others)."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    chosen = torch.as_tensor(rng.choice(n, size=round(fraction * n), replace=False))
    shift = torch.as_tensor(rng.integers(1, n_classes, size=len(chosen)), dtype=labels.dtype)
    out = labels.clone()
    out[chosen] = (labels[chosen] + shift) % n_classes
    return out


def with_flipped_labels(data: FeatureDataset, *, fraction: float, n_classes: int,
                        seed: int) -> FeatureDataset:
    """``data`` with :func:`flip_labels` applied to its labels (features shared, not copied)."""
    flipped = flip_labels(data.features["labels"], fraction=fraction, n_classes=n_classes,
                          seed=seed)
    return FeatureDataset(data.features | {"labels": flipped})


class NoiseOnlyTrainer(PrivateTrainer):
    """A free rider's DP-SGD: the site's own trainer (its q, steps, sigma, clip, optimizer and
    accountant) in which every step is an empty batch, so every step adds the Gaussian noise
    alone and the update carries no signal from any record."""

    def _step(self, indices: list[int]) -> float | None:
        return super()._step([])


def fedavg_replay(start: np.ndarray, rounds: list[list[np.ndarray]],
                  keep: list[int]) -> np.ndarray:
    """The global vector after FedAvg of the recorded updates ``rounds[r][i]`` of the sites
    ``keep``, round by round from ``start`` (float64)."""
    vec = start.astype(np.float64)
    for updates in rounds:
        vec = vec + np.mean([updates[i].astype(np.float64) for i in keep], axis=0)
    return vec


def accuracy_and_macro_f1(predicted: np.ndarray, truth: np.ndarray,
                          n_classes: int) -> tuple[float, float]:
    """Accuracy and macro-F1 (mean over the classes of 2 TP / (2 TP + FP + FN); a class absent
    from both counts as 0)."""
    f1 = []
    for c in range(n_classes):
        tp = int(np.sum((predicted == c) & (truth == c)))
        wrong = int(np.sum((predicted == c) != (truth == c)))
        f1.append(2 * tp / (2 * tp + wrong) if tp + wrong else 0.0)
    return float(np.mean(predicted == truth)), float(np.mean(f1))


def share_against_others(updates: list[np.ndarray], i: int) -> float:
    """<u_i, U - u_i> / ||U||^2: the protocol's share c_i without its self term
    ||u_i||^2 / ||U||^2 (a diagnostic computed in the clear: the protocol does not reveal
    ||u_i||^2 exactly). Every update counted (no dropouts in this bench)."""
    stacked = np.stack([np.asarray(u, dtype=np.float64) for u in updates])
    total = stacked.sum(axis=0)
    return float(stacked[i] @ (total - stacked[i]) / (total @ total))


def share_along(update: np.ndarray, direction: np.ndarray) -> float:
    """<u, v> / ||v||^2: ``update`` along ``direction`` (a diagnostic in the clear; with v the
    earlier rounds' aggregates, no term of it holds this round's own DP noise)."""
    v = np.asarray(direction, dtype=np.float64)
    return float(np.asarray(update, dtype=np.float64) @ v / (v @ v))


def later_and_rest(recorded: list[list[np.ndarray]], totals: list[np.ndarray],
                   names: list[str]) -> tuple[dict[str, float], dict[str, float]]:
    """Diagnostics in the clear: each site's mean over rounds of its update along the LATER
    rounds' aggregates (<u_i^r, U^(r+1) + ... + U^R> / ||.||^2, rounds 1..R-1: a direction no
    site knows when it uploads), and along EVERY OTHER round's aggregate (the sum without round
    r's own, rounds 1..R: none of round r's noise, the most signal)."""
    later: dict[str, list[float]] = {n: [] for n in names}
    rest: dict[str, list[float]] = {n: [] for n in names}
    everything = np.sum(np.stack(totals), axis=0)
    suffix = np.zeros_like(everything)
    for r in range(len(totals) - 1, -1, -1):
        for i, n in enumerate(names):
            if r < len(totals) - 1:
                later[n].append(share_along(recorded[r][i], suffix))
            rest[n].append(share_along(recorded[r][i], everything - totals[r]))
        suffix = suffix + totals[r]
    return ({n: float(np.mean(v)) for n, v in later.items()},
            {n: float(np.mean(v)) for n, v in rest.items()})


def two_lowest(shares: dict[str, float]) -> set[str]:
    """The names of the two lowest shares."""
    return set(sorted(shares, key=shares.__getitem__)[:2])


# ----------------------------------------------------------------------------- the run


def predict(model, data: FeatureDataset, batch_size: int = 512) -> np.ndarray:
    was_training = model.training
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            batch = collate_examples([data[i] for i in range(start, min(start + batch_size,
                                                                          len(data)))])
            batch.pop("labels")
            out.append(model(**batch).argmax(dim=-1).numpy())
    model.train(was_training)
    return np.concatenate(out)


def run_once(seed: int, *, head0, sites: dict[str, FeatureDataset], held_out: FeatureDataset,
             n_classes: int, st: Settings, epsilon: float, probes: int, mode: str) -> dict:
    """One federation of ``st.rounds`` rounds: shares by the protocol, LOO utility in the
    clear. The flipped site's labels are flipped with ``seed``."""
    t0 = time.time()
    sites = dict(sites)
    sites[FLIPPED] = with_flipped_labels(sites[FLIPPED], fraction=FLIP_FRACTION,
                                         n_classes=n_classes, seed=seed)
    names = list(sites)
    ids = [f"enterprise-{i:04d}" for i in range(len(names))]
    model = _copy(head0)
    layout = adapter_layout(model)
    start = get_flat(model, layout)
    global_vec = start.copy()
    plans = {n: dp_plan(len(ds), epsilon=epsilon, st=st) for n, ds in sites.items()}
    recorded: list[list[np.ndarray]] = []
    shares = {n: [] for n in names}
    others = {n: [] for n in names}  # diagnostic in the clear: the share less its self term
    along_past = {n: [] for n in names}  # diagnostic: <u_i, earlier rounds' aggregates>
    past = np.zeros_like(start, dtype=np.float64)
    totals: list[np.ndarray] = []  # each round's aggregate, for the later-rounds diagnostics
    excluded: list[str] = []
    share_err = 0.0
    sum_err = 0.0
    for r in progress.track(range(st.rounds), f"  rounds (seed {seed})", plain=False):
        deltas, bounds = [], []
        for n in names:
            local, config = _copy(model), dp_config(plans[n], r, st)
            if n == FREE_RIDER:
                result = NoiseOnlyTrainer(local, sites[n], config=config).train()
            else:
                result = train_local(local, sites[n], config=config)
            deltas.append(result.delta)
            bounds.append(result.delta_norm_bound)
        # The probes' bound: the largest norm train_local's guard lets a DP update have, so an
        # honest update is never excluded (the shares are the point here, not the exclusion).
        res = simulate(deltas, mode=mode, probes=probes, clip_bound=max(bounds),
                       round_number=r + 1)
        assert res.probes is not None
        excluded += [f"round {r + 1}: {names[ids.index(e)]}" for e in res.probes.excluded]
        plain = plaintext_contributions(deltas, res.survivors)
        for i, n in enumerate(names):
            share = res.probes.contributions.get(ids[i], 0.0)
            shares[n].append(share)
            if i in plain:
                share_err = max(share_err, abs(share - plain[i]))
        total = np.asarray(res.aggregate, dtype=np.float64)
        for i, n in enumerate(names):
            others[n].append(share_against_others(deltas, i))
            if r > 0:
                along_past[n].append(share_along(deltas[i], past))
        past += total
        totals.append(total)
        sum_err = max(sum_err, float(np.abs(total - np.sum(np.stack(deltas).astype(np.float64),
                                                          axis=0)).max())
                      if len(res.survivors) == len(names) else 0.0)
        global_vec = (global_vec.astype(np.float64) + total / len(res.survivors)).astype(
            np.float32)
        set_flat(model, layout, global_vec)
        recorded.append(deltas)

    truth = held_out.features["labels"].numpy()
    evaluated = _copy(head0)

    def utility(keep: list[int]) -> tuple[float, float]:
        set_flat(evaluated, layout, fedavg_replay(start, recorded, keep).astype(np.float32))
        return accuracy_and_macro_f1(predict(evaluated, held_out), truth, n_classes)

    everyone = list(range(len(names)))
    full = utility(everyone)
    secure = accuracy_and_macro_f1(predict(model, held_out), truth, n_classes)
    loo_acc, loo_f1 = {}, {}
    for i, n in enumerate(names):
        without = utility([j for j in everyone if j != i])
        loo_acc[n], loo_f1[n] = full[0] - without[0], full[1] - without[1]
    cumulative = {n: float(np.mean(v)) for n, v in shares.items()}
    against_others = {n: float(np.mean(v)) for n, v in others.items()}
    with_past = {n: float(np.mean(v)) for n, v in along_past.items()}
    with_later, with_rest = later_and_rest(recorded, totals, names)
    eps = {n: ledger_epsilon(plans[n], st.rounds) for n in names}
    lowest = two_lowest(cumulative)
    return {
        "seed": seed, "names": names, "cumulative": cumulative, "shares": shares,
        "loo_acc": loo_acc, "loo_f1": loo_f1, "full": full, "secure": secure,
        "spearman_acc": spearman([cumulative[n] for n in names], [loo_acc[n] for n in names]),
        "spearman_f1": spearman([cumulative[n] for n in names], [loo_f1[n] for n in names]),
        "lowest": sorted(lowest), "last_two_ok": lowest == {FREE_RIDER, FLIPPED},
        "against_others": against_others,
        "spearman_others": spearman([against_others[n] for n in names],
                                    [loo_acc[n] for n in names]),
        "lowest_others": sorted(two_lowest(against_others)),
        "with_past": with_past,
        "spearman_past": spearman([with_past[n] for n in names], [loo_acc[n] for n in names]),
        "lowest_past": sorted(two_lowest(with_past)),
        **{f"{key}": value for tag, got in (("later", with_later), ("rest", with_rest))
           for key, value in ((f"with_{tag}", got),
                              (f"spearman_{tag}", spearman([got[n] for n in names],
                                                           [loo_acc[n] for n in names])),
                              (f"lowest_{tag}", sorted(two_lowest(got))))},
        "below_twin": {site: cumulative[site] < cumulative[twin]
                       for site, twin in EXTRA_SOURCES.items()},
        "plans": plans, "eps": eps, "excluded": excluded, "share_err": share_err,
        "sum_err": sum_err, "seconds": time.time() - t0,
        "sizes": {n: len(sites[n]) for n in names},
    }


# ----------------------------------------------------------------------------- output


def ranks(values: dict[str, float]) -> dict[str, int]:
    """1 = the largest."""
    return {n: k + 1 for k, n in enumerate(sorted(values, key=values.__getitem__, reverse=True))}


def run_lines(run: dict) -> list[str]:
    names, cum = run["names"], run["cumulative"]
    by_share, by_loo = ranks(cum), ranks(run["loo_acc"])
    lines = [f"### seed {run['seed']}", "",
             "| site | records | sigma | q*N | steps | eps (RDP, gated) | eps (PRV) | "
             "cumulative share | share per round (min / max) | LOO accuracy | LOO macro-F1 | "
             "rank by share | rank by LOO accuracy |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for n in names:
        q, steps, sigma, _ = run["plans"][n]
        eps = run["eps"][n]
        lines.append(
            f"| {n} | {run['sizes'][n]} | {sigma:.3f} | {q * run['sizes'][n]:.0f} | "
            f"{steps * len(run['shares'][n])} | {eps['rdp']:.3f} | {eps['prv']:.2f} | "
            f"{cum[n]:.4f} | {min(run['shares'][n]):.4f} / {max(run['shares'][n]):.4f} | "
            f"{run['loo_acc'][n]:+.4f} | {run['loo_f1'][n]:+.4f} | {by_share[n]} | "
            f"{by_loo[n]} |")
    lines += [
        "",
        f"- held-out accuracy / macro-F1 of the 5-site federation: {run['full'][0]:.4f} / "
        f"{run['full'][1]:.4f} (replayed in the clear); the secure run's own model: "
        f"{run['secure'][0]:.4f} / {run['secure'][1]:.4f}",
        f"- Spearman(cumulative share, LOO accuracy) = {run['spearman_acc']:.3f} "
        f"({'meets' if run['spearman_acc'] >= SPEARMAN_TARGET else 'misses'} >= "
        f"{SPEARMAN_TARGET}); with LOO macro-F1: {run['spearman_f1']:.3f}",
        f"- two lowest cumulative shares: {', '.join(run['lowest'])} "
        f"({'the free rider and the flipped site: met' if run['last_two_ok'] else 'target missed'})",
        "- against the honest site of the same profile and size (the same sigma, q and steps): "
        + "; ".join(f"{site} {cum[site]:.4f} vs {twin} {cum[twin]:.4f} "
                    f"({'lower' if run['below_twin'][site] else 'not lower'})"
                    for site, twin in EXTRA_SOURCES.items()),
        "- diagnostic in the clear, the share less its self term (<u_i, U - u_i> / ||U||^2, "
        "not revealed by the protocol): "
        + ", ".join(f"{n} {run['against_others'][n]:+.4f}" for n in names)
        + f"; Spearman with LOO accuracy {run['spearman_others']:.3f}; two lowest "
        f"{', '.join(run['lowest_others'])}",
        "- diagnostic in the clear, each update along the earlier rounds' aggregates (<u_i^r, "
        "U^1 + ... + U^(r-1)> / ||U^1 + ... + U^(r-1)||^2, mean over rounds 2..R): "
        + ", ".join(f"{n} {run['with_past'][n]:+.4f}" for n in names)
        + f"; Spearman with LOO accuracy {run['spearman_past']:.3f}; two lowest "
        f"{', '.join(run['lowest_past'])}",
        *(f"- diagnostic in the clear, each update along {what}: "
          + ", ".join(f"{n} {run[f'with_{tag}'][n]:+.4f}" for n in names)
          + f"; Spearman with LOO accuracy {run[f'spearman_{tag}']:.3f}; two lowest "
          f"{', '.join(run[f'lowest_{tag}'])}"
          for tag, what in (("later", "the LATER rounds' aggregates (<u_i^r, U^(r+1) + ... + "
                                      "U^R> / ||.||^2, mean over rounds 1..R-1; unknown to every "
                                      "site when it uploads)"),
                            ("rest", "every OTHER round's aggregate (<u_i^r, sum of U^s for s "
                                     "!= r> / ||.||^2, mean over rounds 1..R)"))),
        f"- largest |protocol share - share in the clear| = {run['share_err']:.1e}; largest "
        f"|secure sum - plaintext sum| = {run['sum_err']:.1e}; excluded by the probes: "
        f"{', '.join(run['excluded']) or 'none'}; {run['seconds']:.0f} s",
    ]
    return lines


def write_result(runs: list[dict], meta: dict, path: Path) -> None:
    held = [r for r in runs if r["last_two_ok"] and r["spearman_acc"] >= SPEARMAN_TARGET]
    lines = ["# Contribution shares against leave-one-out utility (issue 17, target I)", "",
             f"Measured {meta['date']} on {meta['machine']}; data scale `{meta['scale']}`, model "
             f"size `{meta['size']}`; held-out set: {meta['held_out']}.", "",
             f"Sites: {meta['sites']}.", "",
             f"Training: {meta['settings']}.", "",
             f"Protocol: {meta['protocol']}.", "",
             "Command: `" + meta["command"] + "`.", "",
             "## Summary", "",
             "| seed | Spearman (share, LOO acc) | Spearman (share, LOO macro-F1) | two lowest "
             "shares | free rider + flipped last | target met | each below its same-size "
             "honest site |",
             "|---|---|---|---|---|---|---|"]
    for r in runs:
        ok = r["last_two_ok"] and r["spearman_acc"] >= SPEARMAN_TARGET
        lines.append(f"| {r['seed']} | {r['spearman_acc']:.3f} | {r['spearman_f1']:.3f} | "
                     f"{', '.join(r['lowest'])} | {'yes' if r['last_two_ok'] else 'no'} | "
                     f"{'yes' if ok else 'no'} | "
                     + ", ".join(f"{site}: {'yes' if below else 'no'}"
                                 for site, below in r["below_twin"].items()) + " |")
    lines += ["", f"Target (free rider and flipped site rank last, Spearman with LOO accuracy >= "
              f"{SPEARMAN_TARGET}) holds in {len(held)} of {len(runs)} run(s).", "",
              "## Runs", ""]
    for r in runs:
        lines += run_lines(r) + [""]
    path.write_text("\n".join(lines))


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    progress.quiet_libraries()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", default="demo", choices=["tiny", "demo", "full"],
                    help="data scale of both federations and the held-out set")
    ap.add_argument("--size", default="demo", choices=["tiny", "demo", "full"])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--epsilon", type=float, default=8.0, help="every site's budget")
    ap.add_argument("--local-epochs", type=int, default=1)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--dp-batch", type=int, default=256, help="expected Poisson batch q*N")
    ap.add_argument("--dp-lr", type=float, default=1e-2,
                    help="DP learning rate (bench/results/utility.md's tuned value)")
    ap.add_argument("--dp-optimizer", default="adam", choices=["adam", "sgd"])
    ap.add_argument("--probes", type=int, default=32)
    ap.add_argument("--mode", default="secagg", choices=["secagg", "secagg+"])
    ap.add_argument("--seed", type=int, default=7, help="data seed and the first run's seed")
    ap.add_argument("--seeds", type=int, default=1, help="runs, seeds seed .. seed+N-1")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--work", type=Path, default=None, help="keep data/model/features here")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    st = Settings(argparse.Namespace(
        scope="head", rounds=args.rounds, local_epochs=args.local_epochs, batch=args.dp_batch,
        lr=args.dp_lr, clip=args.clip, dp_batch=args.dp_batch, dp_lr=args.dp_lr,
        dp_optimizer=args.dp_optimizer, seed=args.seed, dp_repeats=1, log_rounds=False))
    work = args.work or Path(tempfile.mkdtemp(prefix="secfed-ranking-"))
    args.out.mkdir(parents=True, exist_ok=True)
    base, inputs, names = prepare_federation(work, seed=args.seed, scale=args.scale,
                                             size=args.size)
    extra_dir, held_dir, feats = work / "extra", work / "held_out", work / "features"
    if not (extra_dir / "federation.json").exists():
        generate_federation(extra_dir, seed=args.seed + 1, scale=args.scale)
    if not (held_dir / "records.jsonl").exists():
        generate_held_out(held_dir, seed=args.seed + HELD_OUT_SEED_OFFSET, scale=args.scale)
    sites = {n: cached_features(base, work / "data" / n, feats / f"{n}.safetensors", inputs)
             for n in names}
    for site, source in EXTRA_SOURCES.items():
        sites[site] = cached_features(base, extra_dir / source,
                                      feats / f"extra_{source}.safetensors", inputs)
    held_out = cached_features(base, held_dir, feats / "held_out.safetensors", inputs)
    select_trainable(base, "head")
    head0 = feature_classifier(base)
    select_trainable(head0, "head")
    n_classes = len(HAZARD_CLASSES)
    sizes = ", ".join(f"{n} {len(ds)}" for n, ds in sites.items())
    log(f"records per site: {sizes}; held-out {len(held_out)}; {n_classes} classes")
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"CPU ({os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
                   f"load average at start {os.getloadavg()[0]:.1f})",
        "scale": args.scale, "size": args.size,
        "held_out": f"{len(held_out)} records of generate_held_out(seed {args.seed} + "
                    f"{HELD_OUT_SEED_OFFSET}), clean labels; utility = held-out accuracy "
                    "(macro-F1 alongside)",
        "sites": f"{sizes}; {FLIPPED}: the energy utility of generate_federation(seed "
                 f"{args.seed + 1}) with {FLIP_FRACTION:.0%} of its labels moved to another "
                 f"class; {FREE_RIDER}: holds the residential operator's records of that "
                 "federation and sends its DP-SGD noise alone (every step an empty batch)",
        "settings": f"trainable set `head` ({adapter_layout(head0).total} parameters) on "
                    f"tower features; {args.rounds} rounds x {args.local_epochs} local "
                    f"epoch(s); DP-SGD {args.dp_optimizer} lr {args.dp_lr:g} (cosine over the "
                    f"rounds), expected batch min({args.dp_batch}, N), per-example clip "
                    f"{args.clip:g}, delta = min(1e-5, 0.1/N), sigma from "
                    f"secfed.privacy.plan_noise for eps = {args.epsilon:g} over the rounds "
                    "(RDP); the eps columns are the accountants' over the real sigma, q, steps",
        "protocol": f"`simulate(updates, mode={args.mode!r}, probes={args.probes}, "
                    "clip_bound=the round's largest DP delta-norm bound)` every round; FedAvg "
                    "of the secure sum; cumulative share = mean share over the rounds; LOO "
                    "in the clear by replaying the recorded DP updates without the site",
        "command": "python bench/contribution_ranking.py " + " ".join(
            sys.argv[1:] if argv is None else argv),
    }
    md = args.out / ("contribution_ranking.md" if args.dp_optimizer == "adam"
                     else f"contribution_ranking_{args.dp_optimizer}.md")
    runs = []
    for seed in range(args.seed, args.seed + args.seeds):
        run = run_once(seed, head0=head0, sites=sites, held_out=held_out, n_classes=n_classes,
                       st=st, epsilon=args.epsilon, probes=args.probes, mode=args.mode)
        runs.append(run)
        print("\n".join(run_lines(run)), flush=True)
        write_result(runs, meta, md)
    held = sum(r["last_two_ok"] and r["spearman_acc"] >= SPEARMAN_TARGET for r in runs)
    log(f"target holds in {held} of {len(runs)} run(s); wrote {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
