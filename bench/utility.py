"""Utility table of the city-safety federation (``make utility``; slow, not in the default tests).

Accuracy on the shared held-out test set for: local-only training per enterprise, centralized
non-private training, federated plaintext FedAvg, federated with secure aggregation (the sum
computed by the real SecAgg state machines in ``secfed.protocol.simulate``), and federated
DP-SGD + secure aggregation at epsilon in {1, 4, 8} (sigma from ``secfed.privacy.plan_noise``
for the whole horizon of rounds x local steps, with RDP: the accountant a site's ledger gates
its budget on), each on the noisy data as generated and on the
copy cleaned by ``secfed data check --fix``.

How it trains (the same for every row): the DP-specific trainable set of
``secfed.models.select_trainable`` (default ``head``: the fusion head on the frozen
pretrained towers, ~40k parameters instead of ~90k with LoRA on both towers), so the towers are
run once per record (``tower_features``) and every row trains the same head copy
(``feature_classifier``) -- the same per-example gradients as the full model with frozen towers.
``--scope adapter`` (LoRA on both towers + the head, the federation's default) or ``top``
trains through the towers on the records themselves instead: every step runs them, about 12 ms
per record on one CPU thread, so a full-scale DP row takes about two hours (``--only eps=8
--variants noisy --log-rounds`` measures one row and logs accuracy per round).
Non-private rows: Adam on mini-batches. DP rows: Opacus DP-SGD through
``secfed.training.train_local`` (Poisson sampling, per-example clipping, Gaussian noise).

Hyperparameters are picked once, on a validation set that is generated from another seed and
shares no record with the test set (``--tune``, on by default): the non-private learning rate by
centralized training, the DP learning rate by the federated DP run at epsilon 8 on the noisy
data. The chosen values are used for every row and printed in the table.

Writes ``bench/results/utility.md`` (rewritten after every row) and ``bench/results/utility.png``.
``--task generative`` runs the generative task's table instead (``bench/generative_utility.py``).

    .venv/bin/python bench/utility.py                  # full scale (thousands of records per site)
    .venv/bin/python bench/utility.py --scale tiny --size tiny --rounds 3   # quick path
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from secfed import progress  # noqa: E402
from secfed.config import FEATURE_SCOPES  # noqa: E402
from secfed.data import load_dataset  # noqa: E402
from secfed.data.loading import model_inputs  # noqa: E402
from secfed.data.quality import MISLABEL_POLICIES, check_dataset, write_cleaned  # noqa: E402
from secfed.data.records import read_records  # noqa: E402
from secfed.models import adapter_layout, get_flat, load_classifier, set_flat  # noqa: E402
from secfed.models.features import FeatureDataset, feature_classifier, tower_features  # noqa: E402
from secfed.models.scopes import TRAINABLE_SCOPES, select_trainable  # noqa: E402
from secfed.privacy import DPSGDEvent, compose_epsilon, plan_noise  # noqa: E402
from secfed.protocol.simulate import simulate  # noqa: E402
from secfed.tasks.citysafety import generate_federation, generate_held_out  # noqa: E402
from secfed.tasks.citysafety.model import prepare_demo_model  # noqa: E402
from secfed.tasks.citysafety.scoring import score_against_truth  # noqa: E402
from secfed.training import DPConfig, collate_examples, evaluate, train_local  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
EPSILONS = (1.0, 4.0, 8.0)
PLAIN_LR_GRID = (3e-4, 1e-3, 3e-3, 1e-2)
DP_LR_GRID = (3e-3, 1e-2, 3e-2)
VALIDATION_SEED_OFFSET = 1000


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Settings:
    """The training settings shared by every row (set from the command line and tuning)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.scope = args.scope
        self.rounds = args.rounds
        self.local_epochs = args.local_epochs
        self.batch = args.batch
        self.lr = args.lr
        self.clip = args.clip
        self.dp_batch = args.dp_batch
        self.dp_lr = args.dp_lr
        self.dp_optimizer = args.dp_optimizer
        self.seed = args.seed
        self.dp_repeats = args.dp_repeats
        self.log_rounds = args.log_rounds
        self.eval_fn = None  # set by main: test accuracy, for --log-rounds

    def describe(self) -> str:
        return (f"trainable set `{self.scope}`; {self.rounds} rounds x {self.local_epochs} local "
                f"epoch(s) (local-only and centralized: {self.rounds * self.local_epochs} epochs); "
                f"learning rates decay by a cosine over the horizon (epochs for one site, "
                f"rounds for the federation); "
                f"non-private: Adam lr {self.lr:g}, batch {self.batch}, batch-gradient clip "
                f"{self.clip:g}; DP-SGD: {self.dp_optimizer} lr {self.dp_lr:g}, expected batch "
                f"min({self.dp_batch}, N) (Poisson), per-example clip {self.clip:g}, "
                f"delta = min(1e-5, 0.1/N), sigma from secfed.privacy.plan_noise (RDP, the accountant "
                f"a site's ledger gates on) for rounds x local steps; notes give the epsilon "
                f"each site's ledger would show after the last round (RDP, gated; PRV, "
                f"reported); "
                f"DP rows: mean of {self.dp_repeats} run(s)")


def cosine_lr(lr: float, step: int, total: int) -> float:
    """Learning rate at ``step`` of ``total`` (0-based): cosine decay from ``lr`` towards 0.

    Every row anneals over its whole horizon (epochs for one site, rounds for a federation),
    so the model a row reports is a settled one, not wherever the last noisy step left it.
    """
    return lr * 0.5 * (1.0 + math.cos(math.pi * step / max(1, total)))


def train_plain(model, dataset, *, epochs: int, seed: int, st: Settings,
                lr: float | None = None, anneal: bool = True) -> None:
    """Non-private baseline: Adam on shuffled mini-batches (batch gradient clipped); the
    learning rate (``st.lr`` unless given) decays by :func:`cosine_lr` over the epochs when
    ``anneal`` (federated rounds anneal across rounds instead and pass ``anneal=False``)."""
    params = [p for p in model.parameters() if p.requires_grad]
    base_lr = st.lr if lr is None else lr
    opt = torch.optim.Adam(params, lr=base_lr)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for epoch in range(epochs):
        if anneal:
            for group in opt.param_groups:
                group["lr"] = cosine_lr(base_lr, epoch, epochs)
        order = torch.randperm(len(dataset), generator=gen).tolist()
        for start in range(0, len(order), st.batch):
            batch = collate_examples([dataset[i] for i in order[start:start + st.batch]])
            labels = batch.pop("labels")
            loss = torch.nn.functional.cross_entropy(model(**batch), labels)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, st.clip)
            opt.step()
        if anneal and st.log_rounds and st.eval_fn is not None:
            log(f"  epoch {epoch + 1}/{epochs}: test accuracy {st.eval_fn(model):.3f}")


def dp_plan(n: int, *, epsilon: float, st: Settings) -> tuple[float, int, float, float]:
    """(q, local steps per round, sigma, delta) for one enterprise of ``n`` records: the
    product's ``secfed.privacy.plan_noise`` (sigma calibrated once for rounds x local steps with
    RDP, the accountant a site's ledger gates its budget with; delta = min(1e-5, 0.1/N))."""
    q = min(1.0, st.dp_batch / n)
    steps = max(1, math.ceil(st.local_epochs / q))
    plan = plan_noise(n_records=n, sample_rate=q, steps_per_round=steps, rounds=st.rounds,
                      budget_epsilon=epsilon, accountant="rdp")
    return q, steps, plan.noise_multiplier, plan.delta


def dp_config(plan: tuple[float, int, float, float], r: int, st: Settings) -> DPConfig:
    """The DP-SGD settings of round ``r`` (0-based) for a site with ``plan`` (:func:`dp_plan`):
    its q, steps and sigma, the per-example clip, the DP learning rate decayed by
    :func:`cosine_lr` over the rounds."""
    q, steps, sigma, _ = plan
    return DPConfig(noise_multiplier=sigma, sample_rate=q, local_steps=steps,
                    max_grad_norm=st.clip, learning_rate=cosine_lr(st.dp_lr, r, st.rounds),
                    optimizer=st.dp_optimizer)


@functools.cache
def ledger_epsilon(plan: tuple[float, int, float, float], rounds: int) -> dict[str, float]:
    """What a site's ledger shows after ``rounds`` rounds charged with ``plan``'s per-round
    event: epsilon of the budget accountant (RDP, the one it gates on) and the reported PRV."""
    q, steps, sigma, delta = plan
    events = [DPSGDEvent(noise_multiplier=sigma, sample_rate=q, steps=steps)] * rounds
    return {acc: compose_epsilon(events, delta=delta, accountant=acc) for acc in ("rdp", "prv")}


def federated(head0, datasets: dict, *, secure: bool, epsilon: float | None, st: Settings,
              stats: dict):
    """FedAvg over the enterprises: global += mean of the deltas, ``st.rounds`` rounds.

    Plaintext and secure runs use the same seeds for every local run, so they differ only by
    the fixed-point quantisation of the secure sum.
    """
    model = _copy(head0)
    layout = adapter_layout(model)
    global_vec = get_flat(model, layout)
    plans = {}
    if epsilon is not None:
        plans = {name: dp_plan(len(ds), epsilon=epsilon, st=st) for name, ds in datasets.items()}
        stats["sigma"] = {k: round(v[2], 3) for k, v in plans.items()}
        stats["q*N"] = {k: round(v[0] * len(datasets[k])) for k, v in plans.items()}
        stats["steps"] = {k: v[1] * st.rounds for k, v in plans.items()}
        eps = {k: ledger_epsilon(v, st.rounds) for k, v in plans.items()}
        stats["ledger eps (rdp, gated)"] = {k: round(v["rdp"], 3) for k, v in eps.items()}
        stats["ledger eps (prv, reported)"] = {k: round(v["prv"], 2) for k, v in eps.items()}
    max_diff = 0.0
    for r in progress.track(range(st.rounds), "  rounds", plain=False):
        deltas = []
        for k, (name, ds) in enumerate(datasets.items()):
            local = _copy(model)
            if epsilon is None:
                train_plain(local, ds, epochs=st.local_epochs, seed=st.seed * 1000 + r * 10 + k,
                            st=st, lr=cosine_lr(st.lr, r, st.rounds), anneal=False)
                deltas.append(get_flat(local, layout) - global_vec)
            else:
                deltas.append(train_local(local, ds, config=dp_config(plans[name], r, st)).delta)
        plain_sum = np.sum(np.stack(deltas).astype(np.float64), axis=0)
        if secure:
            result = simulate(deltas, mode="secagg", round_number=r + 1)
            total = np.asarray(result.aggregate, dtype=np.float64)
            max_diff = max(max_diff, float(np.abs(total - plain_sum).max()))
        else:
            total = plain_sum
        global_vec = (global_vec.astype(np.float64) + total / len(deltas)).astype(np.float32)
        set_flat(model, layout, global_vec)
        if st.log_rounds and st.eval_fn is not None:
            log(f"  round {r + 1}/{st.rounds}: test accuracy {st.eval_fn(model):.3f}")
    if secure:
        stats["secure_vs_plain_max_abs_diff"] = f"{max_diff:.1e}"
    return model


def _copy(model):
    return copy.deepcopy(model)


# ----------------------------------------------------------------------------- output


def write_table(rows: list[dict], meta: dict, path: Path) -> None:
    lines = ["# City-safety utility table", "",
             f"Measured {meta['date']} on {meta['machine']}; data scale `{meta['scale']}` "
             f"({meta['sizes']}), model size `{meta['size']}`. Test set: {meta['test_n']} "
             "records (all 7 classes, clean labels).", "",
             f"Training: {meta['settings']}.", "",
             f"Cleaned data: the copy `secfed data check --fix --mislabels {meta['mislabels']}` "
             "writes (duplicates dropped; a report that contradicts its image removed, image and "
             f"label kept; likely mislabels: {meta['mislabels']}).", "",
             f"Hyperparameters: {meta['tuning']}", "",
             "Command: `" + meta["command"] + "`.", "",
             "| setting | noisy data | cleaned data | notes |", "|---|---|---|---|"]
    for row in rows:
        def cell(key, row=row):
            v = row.get(key)
            return "-" if v is None else f"{v:.3f}"
        lines.append(f"| {row['name']} | {cell('noisy')} | {cell('clean')} | "
                     f"{row.get('notes', '')} |")
    lines += ["", *target_lines(rows)]
    if meta.get("quality"):
        lines += ["", "Data check against the injected defects (precision / recall):", "",
                  "| enterprise | duplicates | mislabels | mismatches | records kept | reports "
                  "removed | relabelled |", "|---|---|---|---|---|---|---|"]
        for name, q in meta["quality"].items():
            lines.append(f"| {name} | " + " | ".join(
                f"{q[k]['precision']:.2f} / {q[k]['recall']:.2f}"
                for k in ("duplicates", "mislabels", "mismatches")) + f" | {q['kept']} | "
                f"{q.get('text removed', '-')} | {q.get('relabelled', '-')} |")
    path.write_text("\n".join(lines) + "\n")


def target_lines(rows: list[dict]) -> list[str]:
    """The issue's targets, checked against the measured rows (whatever they show)."""
    by = {r["name"]: r for r in rows}
    out = ["Targets (computed from the rows above):", ""]
    dp, cen = by.get("DP-SGD + SecAgg, eps=8"), by.get("centralized, non-private")
    locals_ = [r for r in rows if r["name"].startswith("local only")]
    for variant in ("noisy", "clean"):
        if dp and cen and dp.get(variant) is not None and cen.get(variant):
            ratio = dp[variant] / cen[variant]
            out.append(f"- {variant}: DP eps=8 / centralized = {ratio:.3f} "
                       f"({'meets' if ratio >= 0.9 else 'misses'} >= 0.90)")
            if locals_ and all(r.get(variant) is not None for r in locals_):
                best = max(r[variant] for r in locals_)
                out.append(f"- {variant}: DP eps=8 {dp[variant]:.3f} vs best local-only "
                           f"{best:.3f} ({'beats' if dp[variant] > best else 'does not beat'} "
                           "every local-only model)")
    clean_up = [r["name"] for r in rows if r.get("noisy") is not None
                and r.get("clean") is not None and r["clean"] > r["noisy"]]
    both = [r for r in rows if r.get("noisy") is not None and r.get("clean") is not None]
    if both:
        out.append(f"- cleaning raises accuracy in {len(clean_up)} of {len(both)} rows")
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["name"] for r in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(6, len(rows) * 0.9), 4.5))
    for off, key in ((-0.2, "noisy"), (0.2, "clean")):
        ax.bar(x + off, [r.get(key) or 0 for r in rows], width=0.4, label=key)
    ax.set_xticks(x, names, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- data


def cached_features(model, data_dir: Path, cache: Path, inputs, dataset=None) -> FeatureDataset:
    """Tower features of every record of ``data_dir`` (cached as safetensors in ``cache``)."""
    from safetensors.torch import load_file, save_file

    if cache.exists():
        return FeatureDataset(load_file(str(cache)))
    t = time.time()
    if dataset is None:
        dataset = load_dataset(data_dir, inputs=inputs)
    features = tower_features(model, dataset)
    cache.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in features.items()}, str(cache))
    log(f"features of {data_dir.name}: {len(dataset)} records ({time.time() - t:.0f} s)")
    return FeatureDataset(features)


def record_ids(data_dir: Path) -> list[str]:
    return [r.id for r in read_records(data_dir, check_images=False)[1]]


def cleaned_features(noisy: FeatureDataset, data_dir: Path,
                     clean_dir: Path) -> tuple[FeatureDataset, dict]:
    """The features of the cleaned copy ``clean_dir`` of ``data_dir``: its records' rows of
    ``noisy``, with the label it holds and its text marked absent where the fix removed it."""
    meta, original = read_records(data_dir, check_images=False)
    _, cleaned = read_records(clean_dir, check_images=False)
    position = {r.id: i for i, r in enumerate(original)}
    index = {c: i for i, c in enumerate(meta.taxonomy)}
    rows = [position[r.id] for r in cleaned]
    out = noisy.subset(rows)
    f = out.features
    stripped = relabelled = 0
    for k, r in enumerate(cleaned):
        if r.text is None and original[rows[k]].text is not None:
            f["text_present"][k] = 0
            f["text"][k] = 0
            stripped += 1
        if index[r.label] != int(f["labels"][k]):
            f["labels"][k] = index[r.label]
            relabelled += 1
    return out, {"text removed": stripped, "relabelled": relabelled}


def prepare_federation(work: Path, *, seed: int, scale: str, size: str):
    """The city-safety federation in ``work/data`` and the model in ``work/model``, each made
    once (kept for the next run); returns (the loaded classifier, its model inputs, the
    enterprise names)."""
    fed_dir, model_dir = work / "data", work / "model"
    if not (fed_dir / "federation.json").exists():
        t = time.time()
        generate_federation(fed_dir, seed=seed, scale=scale)
        log(f"generated federation (scale {scale}) in {fed_dir} ({time.time() - t:.0f} s)")
    if not (model_dir / "secfed_model.json").exists():
        log(f"preparing model (size {size})")
        prepare_demo_model(model_dir, seed=seed, size=size, log=log)
    base, _ = load_classifier(model_dir)
    fed = json.loads((fed_dir / "federation.json").read_text())
    return base, model_inputs(model_dir), fed["enterprises"]


def main() -> int:
    progress.quiet_libraries()  # secfed's progress on stderr, not transformers' bars
    if "--task" in sys.argv:  # --task generative: the instruction-tuned causal LM's table
        task = sys.argv[sys.argv.index("--task") + 1:][:1]
        if task != ["classify"]:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from generative_utility import main as generative_main

            return generative_main(sys.argv[1:])
        sys.argv[sys.argv.index("--task"):sys.argv.index("--task") + 2] = []
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", default="full", choices=["tiny", "demo", "full"])
    ap.add_argument("--size", default="demo", choices=["tiny", "demo", "full"])
    ap.add_argument("--scope", default="head", choices=TRAINABLE_SCOPES,
                    help="trainable set: head/classifier train on tower features computed "
                         "once; adapter/top train LoRA through the towers (every step runs "
                         "them: hours at full scale on a CPU)")
    # 20 rounds x 1 local epoch rather than 10 x 2: the same DP-SGD steps, so the same sigma
    # at each epsilon, averaged twice as often (validation, DP eps=8, plaintext sum, mean of
    # 3 runs at 10 x 2 and 4 at 20 x 1: noisy 0.714 -> 0.717, cleaned 0.713 -> 0.725;
    # 40 x 0.5: 0.717 -- 0.722; the non-private rows keep 20 epochs)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--local-epochs", type=int, default=1)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3, help="non-private Adam lr (if no --tune)")
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--dp-batch", type=int, default=256, help="expected Poisson batch q*N")
    ap.add_argument("--dp-lr", type=float, default=3e-3, help="DP lr (if no --tune)")
    ap.add_argument("--dp-optimizer", default="adam", choices=["adam", "sgd"])
    ap.add_argument("--dp-repeats", type=int, default=3,
                    help="DP rows: mean test accuracy of this many runs (fresh noise each)")
    ap.add_argument("--no-tune", dest="tune", action="store_false",
                    help="use --lr/--dp-lr as given instead of picking them on validation data")
    ap.add_argument("--mislabels", default="review", choices=MISLABEL_POLICIES,
                    help="the cleaned copy's mislabel policy (secfed data check --mislabels)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--work", type=Path, default=None, help="keep data/model/features here")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--only", default=None,
                    help="run only the rows whose name contains this (comma-separated: any)")
    ap.add_argument("--variants", default="noisy,clean",
                    help="which data to train each row on: noisy, clean or both (default)")
    ap.add_argument("--log-rounds", action="store_true",
                    help="log test accuracy after every federated round (and every epoch "
                         "of centralized and local-only training)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    st = Settings(args)
    torch.manual_seed(args.seed)
    work = args.work or Path(tempfile.mkdtemp(prefix="secfed-utility-"))
    args.out.mkdir(parents=True, exist_ok=True)
    md, png = args.out / "utility.md", args.out / "utility.png"
    fed_dir, model_dir, val_dir = work / "data", work / "model", work / "validation"
    if args.tune and not (val_dir / "records.jsonl").exists():
        # like the test set, from another seed: no record in common with it
        generate_held_out(val_dir, seed=args.seed + VALIDATION_SEED_OFFSET, scale=args.scale)
    base, inputs, names = prepare_federation(work, seed=args.seed, scale=args.scale,
                                             size=args.size)
    feats = work / "features"
    test = cached_features(base, fed_dir / "test", feats / "test.safetensors", inputs)
    noisy, clean, quality = {}, {}, {}
    for n in names:
        out = work / "clean" / n
        qfile = work / "clean" / f"{n}.quality.json"
        fixed = out / "quality_report.json"
        if qfile.exists() and (not fixed.exists() or json.loads(fixed.read_text()).get(
                "fix", {}).get("mislabel_policy") != args.mislabels):
            qfile.unlink()  # cleaned under another --mislabels policy (or before them): again
        if not qfile.exists():
            t = time.time()
            report, dataset = check_dataset(fed_dir / n, model_dir=model_dir, model=base)
            if out.exists():
                shutil.rmtree(out)  # a check interrupted before its scores were written
            write_cleaned(fed_dir / n, out, report, mislabels=args.mislabels)
            truth = json.loads((fed_dir / "truth" / f"{n}.json").read_text())
            scores = score_against_truth(report, truth)
            qfile.write_text(json.dumps(scores))
            log(f"data check {n} ({time.time() - t:.0f} s): {scores}")
        else:
            dataset = None
        noisy[n] = cached_features(base, fed_dir / n, feats / f"{n}.safetensors", inputs, dataset)
        clean[n], changes = cleaned_features(noisy[n], fed_dir / n, out)
        quality[n] = json.loads(qfile.read_text()) | {
            "kept": f"{len(clean[n])}/{len(noisy[n])}", **changes}
    if args.scope not in FEATURE_SCOPES:
        # LoRA through the towers: every step runs them, so train on the records themselves
        noisy = {n: load_dataset(fed_dir / n, inputs=inputs) for n in names}
        clean = {n: load_dataset(work / "clean" / n, inputs=inputs) for n in names}
        test = load_dataset(fed_dir / "test", inputs=inputs)
    sizes = ", ".join(f"{n} {len(noisy[n])}" for n in names)
    log(f"records per enterprise: {sizes}; test {len(test)}")

    select_trainable(base, args.scope)
    if args.scope in FEATURE_SCOPES:
        head0 = feature_classifier(base)
        select_trainable(head0, args.scope)
    else:
        head0 = base
    dims = adapter_layout(head0).total

    def acc(model, data=test) -> float:
        return evaluate(model, data, batch_size=512)["accuracy"]

    st.eval_fn = acc
    variants = [v.strip() for v in args.variants.split(",")]
    if not variants or not set(variants) <= {"noisy", "clean"}:
        ap.error(f"--variants must name noisy and/or clean (got {args.variants!r})")

    def centralized(data, stats, epochs=None):
        model = _copy(head0)
        union = torch.utils.data.ConcatDataset(list(data.values()))
        train_plain(model, union, epochs=epochs or st.rounds * st.local_epochs, seed=st.seed,
                    st=st)
        return model

    tuning = "as given on the command line (no tuning)"
    if args.tune:
        val = cached_features(base, val_dir, feats / "validation.safetensors", inputs)
        scores = {}
        for lr in PLAIN_LR_GRID:
            st.lr = lr
            scores[lr] = acc(centralized(noisy, {}), val)
            log(f"tune: centralized non-private lr {lr:g}: validation {scores[lr]:.3f}")
        st.lr = max(PLAIN_LR_GRID, key=lambda v: (scores[v], -v))
        dp_scores = {}
        for lr in DP_LR_GRID:
            st.dp_lr = lr
            dp_scores[lr] = acc(federated(head0, noisy, secure=False, epsilon=8.0, st=st,
                                          stats={}), val)
            log(f"tune: DP eps=8 lr {lr:g}: validation {dp_scores[lr]:.3f}")
        st.dp_lr = max(DP_LR_GRID, key=lambda v: (dp_scores[v], -v))
        tuning = (f"picked on a validation set of {len(val)} records generated from seed "
                  f"{args.seed + VALIDATION_SEED_OFFSET} (never the test set), noisy data: "
                  f"non-private Adam lr {st.lr:g} from "
                  + ", ".join(f"{k:g}: {v:.3f}" for k, v in scores.items())
                  + f" (centralized); DP lr {st.dp_lr:g} from "
                  + ", ".join(f"{k:g}: {v:.3f}" for k, v in dp_scores.items())
                  + " (federated DP, eps=8, plaintext sum). Same values for every row.")
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": f"CPU ({os.cpu_count()} cores, torch threads {torch.get_num_threads()})",
            "scale": args.scale, "size": args.size, "sizes": f"records per enterprise: {sizes}",
            "test_n": len(test), "quality": quality, "tuning": tuning,
            "mislabels": args.mislabels,
            "settings": st.describe() + f"; {dims} trainable parameters",
            "command": "python bench/utility.py " + " ".join(sys.argv[1:])}
    rows: list[dict] = []

    def record(name: str, run, repeats: int = 1) -> None:
        row = {"name": name, "notes": ""}
        rows.append(row)
        for variant, data in (("noisy", noisy), ("clean", clean)):
            if variant not in variants:
                continue
            t = time.time()
            stats: dict = {}
            runs = [acc(run(data, stats)) for _ in range(repeats)]
            row[variant] = float(np.mean(runs))
            if repeats > 1:
                stats[f"{variant} runs"] = "/".join(f"{a:.3f}" for a in runs)
                row.setdefault("runs", {})[variant] = stats[f"{variant} runs"]
            if stats:
                notes = {k: v for k, v in stats.items() if not k.endswith(" runs")}
                notes |= {f"{k} runs": v for k, v in row.get("runs", {}).items()}
                row["notes"] = "; ".join(f"{k}={v}" for k, v in notes.items())
            log(f"{name} [{variant}]: {row[variant]:.3f} ({time.time() - t:.0f} s) {stats}")
            write_table(rows, meta, md)
        plot(rows, png)

    def local_only_run(n):
        def run(data, stats):
            model = _copy(head0)
            train_plain(model, data[n], epochs=st.rounds * st.local_epochs, seed=st.seed, st=st)
            return model
        return run

    def fed_run(secure, eps):
        return lambda data, stats: federated(head0, data, secure=secure, epsilon=eps, st=st,
                                             stats=stats)

    # The rows the targets compare come first, so a run cut short still answers them.
    plan = [("centralized, non-private", centralized),
            ("DP-SGD + SecAgg, eps=8", fed_run(True, 8.0)),
            *[(f"local only: {n}", local_only_run(n)) for n in names],
            ("FedAvg plaintext", fed_run(False, None)),
            ("FedAvg + SecAgg", fed_run(True, None)),
            *[(f"DP-SGD + SecAgg, eps={e:g}", fed_run(True, e))
              for e in sorted(EPSILONS, reverse=True) if e != 8.0]]
    chosen = [(name, run) for name, run in plan
              if args.only is None or any(part in name for part in args.only.split(","))]
    with progress.task("utility rows", total=len(chosen)) as rows_done:
        for name, run in chosen:
            # DP noise is fresh (OS CSPRNG) every run: DP rows are the mean of --dp-repeats runs
            record(name, run, repeats=args.dp_repeats if name.startswith("DP") else 1)
            rows_done.advance()
    plot(rows, png)
    log(f"wrote {md} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
