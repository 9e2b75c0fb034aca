"""Federated DP settings of the generative task, scored on the VALIDATION split only.

The tuning harness behind ``bench/generative_utility.py``'s defaults: one federated DP-SGD run
(FedAvg of the sites' DP-SGD deltas, summed by the real SecAgg state machines, or a server
optimizer over the rounds' mean updates: ``--server-opt momentum|adam``) at one
epsilon, with sigma from ``plan_noise`` (RDP), scored by greedy field accuracy on
``validation/`` -- never on ``test/``, which only the utility table reads. ``--sigma-scale 0``
is a diagnostic (no noise: no privacy) that separates the cost of the noise from the cost of
too few steps; it is refused without ``--diagnostic``.

    .venv/bin/python bench/generative_tune.py --work bench/.work-generative/demo-demo-7 \\
        --lora-r 2 --clip 0.3 --central
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generative_utility import (  # noqa: E402
    ServerStep,
    add_server_args,
    cosine,
    model_at_rank,
    plan_sites,
    train_plain,
)

from secfed.data.instructions import load_instruction_dataset  # noqa: E402
from secfed.models import adapter_layout, get_flat, load_model, set_flat  # noqa: E402
from secfed.privacy import DPSGDEvent, compose_epsilon  # noqa: E402
from secfed.protocol.simulate import simulate  # noqa: E402
from secfed.tasks.citysafety.generative import answer_accuracy  # noqa: E402
from secfed.tasks.citysafety.instructions import generate_instruction_federation  # noqa: E402
from secfed.training import DPConfig, train_local  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="generative DP settings on the validation split")
    ap.add_argument("--work", type=Path, default=Path("bench/.work-generative/demo-demo-7"),
                    help="a work directory bench/utility.py --task generative prepared")
    ap.add_argument("--size", default="demo")
    ap.add_argument("--scale", default="demo", choices=["tiny", "demo", "full"],
                    help="records a site, used only when --work holds no data yet")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--pretrain-epochs", type=int, default=None,
                    help="pre-training epochs of the stand-in base (default: the size's)")
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--lora-targets", default="auto",
                    help="auto (attention q/v) or module leaf names NAME,...")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--local-epochs", type=float, default=1.0)
    ap.add_argument("--dp-batch", type=int, default=128)
    ap.add_argument("--dp-lr", type=float, default=0.02)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--optimizer", default="adam", choices=["adam", "sgd"])
    ap.add_argument("--eps", type=float, default=8.0)
    ap.add_argument("--sigma-scale", type=float, default=1.0)
    ap.add_argument("--diagnostic", action="store_true")
    ap.add_argument("--central", action="store_true", help="also centralized non-private")
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--eval-every", type=int, default=0)
    ap.add_argument("--freeze-lora-a", action="store_true",
                    help="train only LoRA's B matrices, A fixed at its random init (FFA-LoRA, "
                         "Sun et al. 2024): half the noised values, and FedAvg of B is exact")
    add_server_args(ap)
    args = ap.parse_args(argv)
    if args.sigma_scale != 1.0 and not args.diagnostic:
        ap.error("--sigma-scale other than 1 runs below the planned noise: add --diagnostic")
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    if not (args.work / "data" / "federation.json").is_file():
        generate_instruction_federation(args.work / "data", seed=args.seed, scale=args.scale)
    model_dir = model_at_rank(args.work, args, args.lora_r, args.lora_targets)
    base, info = load_model(model_dir)
    if args.freeze_lora_a:
        frozen = [n for n, p in base.named_parameters() if p.requires_grad and ".lora_A." in n]
        if not frozen:
            ap.error("--freeze-lora-a: the model has no LoRA A matrices")
        for n, p in base.named_parameters():
            if n in frozen:
                p.requires_grad_(False)
    names = json.loads((args.work / "data" / "federation.json").read_text())["enterprises"]
    sites = {n: load_instruction_dataset(args.work / "data" / n, model_dir=model_dir)
             for n in names}
    val = [json.loads(line) for line in
           (args.work / "data" / "validation" / "records.jsonl").read_text().splitlines()]
    start = time.time()

    def score(model, tag: str) -> None:
        s = answer_accuracy(model, info.tokenizer, val)
        print(f"{tag}: validation fields {s['fields']:.3f} hazard {s['hazard']:.3f} priority "
              f"{s['priority']:.3f} action {s['action']:.3f} ({time.time() - start:.0f} s)",
              flush=True)

    if args.central:
        m = copy.deepcopy(base)
        train_plain(m, torch.utils.data.ConcatDataset(list(sites.values())),
                    epochs=args.epochs, lr=args.lr, batch=32, seed=args.seed)
        score(m, "centralized (non-private)")
    model = copy.deepcopy(base)
    layout = adapter_layout(model)
    global_vec = get_flat(model, layout)
    full = plan_sites(sites, args, args.eps)
    plans = {name: plan[:3] for name, plan in full.items()}
    ledger = {name: round(compose_epsilon(
        [DPSGDEvent(noise_multiplier=sigma, sample_rate=q, steps=steps)] * args.rounds,
        delta=delta, accountant="rdp"), 3) for name, (q, steps, sigma, delta) in full.items()}
    print(f"adapter values {layout.total}; plans (q, steps/round, sigma): {plans}; "
          f"accountant eps (rdp, {args.rounds} rounds): {ledger}", flush=True)
    server = ServerStep.of(args)
    for r in range(args.rounds):
        deltas = []
        for name, ds in sites.items():
            q, steps, sigma = plans[name]
            cfg = DPConfig(noise_multiplier=sigma * args.sigma_scale, sample_rate=q,
                           local_steps=steps, max_grad_norm=args.clip,
                           learning_rate=cosine(args.dp_lr, r, args.rounds),
                           optimizer=args.optimizer,
                           allow_zero_noise=args.diagnostic)
            deltas.append(train_local(copy.deepcopy(model), ds, config=cfg).delta)
        total = np.asarray(simulate(deltas, mode="secagg", round_number=r + 1).aggregate,
                           dtype=np.float64)  # the real SecAgg state machines' sum
        before = global_vec
        global_vec = server(global_vec, total / len(deltas))
        set_flat(model, layout, global_vec)
        rms = float(np.sqrt(np.mean((total / len(deltas)) ** 2)))
        moved = float(np.sqrt(np.mean((global_vec.astype(np.float64) - before) ** 2)))
        print(f"round {r + 1}/{args.rounds} ({time.time() - start:.0f} s): mean update rms "
              f"{rms:.2e}, server step rms {moved:.2e}", flush=True)
        if args.eval_every and (r + 1) % args.eval_every == 0 and r + 1 < args.rounds:
            score(model, f"federated round {r + 1}")
    score(model, f"federated DP eps={args.eps:g} ({vars(args)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
