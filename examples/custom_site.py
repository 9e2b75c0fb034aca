"""Bring your own model and training loop to a secfed federation.

A site that keeps its own PyTorch code implements :class:`secfed.Site` -- the current global
vector, ``train(terms)`` returning the update and the DP mechanism it ran, ``apply`` and
``evaluate`` -- and calls :func:`secfed.join`. secfed does the rest: the round's checks, the
privacy ledger (charged before the update exists), secure aggregation, confirmations.

Here the user's model is a small MLP over tabular features, trained by a plain PyTorch DP-SGD
loop: Poisson sampling with rate q, per-example gradients (``torch.func``), clipping to C,
Gaussian noise sigma*C from secfed's CSPRNG sampler, division by the expected batch q*N, SGD.
Only the trainable vector (all MLP weights here) is federated.

    # admin, once (a local federation of three sites for trying this out):
    python examples/custom_site.py init --out kits --enterprise acme --enterprise globex \\
        --enterprise initech
    secfed aggregate --kit kits/coordinator &
    # every site, with its own kit:
    python examples/custom_site.py join --kit kits/acme --new-ledger
"""

from __future__ import annotations

import argparse
import hashlib
import json
import secrets
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import secfed
from secfed.federation.kits import EnterpriseKit
from secfed.training.noise import SecureGaussianNoise

FEATURES, CLASSES, HIDDEN = 8, 3, 16


def build_model() -> nn.Module:
    """The user's own model; every site builds the same initial weights (public seed)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, CLASSES))


def local_data(enterprise: str, n: int = 400) -> tuple[torch.Tensor, torch.Tensor]:
    """Stand-in for the site's private records: 3 Gaussian classes, a site-specific class mix."""
    seed = int.from_bytes(hashlib.sha256(enterprise.encode()).digest()[:4], "big")
    rng = np.random.default_rng(seed)  # data generation only, not a secret
    centres = np.random.default_rng(1).normal(0, 2, (CLASSES, FEATURES))  # shared task
    mix = rng.dirichlet(np.ones(CLASSES) * 2)
    y = rng.choice(CLASSES, size=n, p=mix)
    x = centres[y] + rng.normal(0, 1.5, (n, FEATURES))
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.long)


class TabularSite:
    """:class:`secfed.Site` over the MLP: the vector is every parameter, flattened in order."""

    def __init__(self, enterprise: str) -> None:
        self.model = build_model()
        self.x, self.y = local_data(enterprise)

    def global_vector(self) -> np.ndarray:
        return torch.cat([p.detach().reshape(-1) for p in self.model.parameters()]).numpy()

    def apply(self, new_global: np.ndarray) -> None:
        torch.nn.utils.vector_to_parameters(torch.from_numpy(np.array(new_global)),
                                            self.model.parameters())

    def evaluate(self) -> dict[str, float]:
        with torch.no_grad():
            return {"accuracy": float((self.model(self.x).argmax(1) == self.y).float().mean())}

    def train(self, terms) -> secfed.Update:
        """One round of DP-SGD exactly as ``terms`` fix it (sigma, q, steps, C, lr)."""
        start = self.global_vector()
        params = {k: v.detach() for k, v in self.model.named_parameters()}
        n, q, clip = len(self.y), terms.sample_rate, terms.max_grad_norm
        noise = SecureGaussianNoise(terms.noise_multiplier * clip)
        sampler = torch.Generator().manual_seed(secrets.randbits(63))  # Poisson draws only

        def loss(p, x, y):
            out = functional_call(self.model, p, (x[None],))
            return nn.functional.cross_entropy(out, y[None])

        per_example = vmap(grad(loss), in_dims=(None, 0, 0))
        for _ in range(terms.local_steps):  # empty batches still step (pure noise)
            batch = torch.rand(n, generator=sampler) < q
            clipped = torch.zeros(sum(v.numel() for v in params.values()))
            if batch.any():
                grads = per_example(params, self.x[batch], self.y[batch])
                flat = torch.cat([g.reshape(g.shape[0], -1) for g in grads.values()], 1)
                scale = (clip / flat.norm(dim=1).clamp(min=1e-12)).clamp(max=1.0)
                clipped = (flat * scale[:, None]).sum(0)
            noisy = noise(clipped) / (q * n)
            at = 0
            for k, v in params.items():
                params[k] = v - terms.learning_rate * noisy[at:at + v.numel()].view_as(v)
                at += v.numel()
        self.apply(torch.cat([v.reshape(-1) for v in params.values()]).numpy())
        delta = self.global_vector() - start
        self.apply(start)  # the update leaves only through the protocol
        return secfed.Update(delta=delta, mechanism=secfed.Mechanism(
            noise_multiplier=terms.noise_multiplier, sample_rate=q, steps=terms.local_steps))


def init_federation(out: Path, enterprises: list[str], *, rounds: int, url: str) -> None:
    """The admin's side for a local trial: kits for a coordinator and each enterprise."""
    from secfed.config import Deadlines, DPSettings
    from secfed.federation.kits import create_kits

    create_kits(out, name="custom-site", enterprises=enterprises, coordinator_url=url,
                model=secfed.site_settings(TabularSite(enterprises[0]).global_vector()),
                rounds=rounds, deadlines=Deadlines(train=120, stage=30, applied=30),
                dp=DPSettings(noise_multiplier=1.0, sample_rate=0.1, local_steps=10,
                              learning_rate=0.5, max_grad_norm=1.0))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    init = sub.add_parser("init", help="make a local federation's kits")
    init.add_argument("--out", type=Path, required=True)
    init.add_argument("--enterprise", action="append", required=True)
    init.add_argument("--rounds", type=int, default=3)
    init.add_argument("--url", default="https://127.0.0.1:8443")
    join = sub.add_parser("join", help="take part with this site's own model")
    join.add_argument("--kit", type=Path, required=True)
    join.add_argument("--new-ledger", action="store_true")
    args = ap.parse_args(argv)
    try:
        if args.command == "init":
            init_federation(args.out, args.enterprise, rounds=args.rounds, url=args.url)
            return 0
        kit = EnterpriseKit.load(args.kit)
        reports = secfed.join(kit, TabularSite(kit.enterprise_id), new_ledger=args.new_ledger,
                              events=lambda e: print(json.dumps(e, default=str), flush=True))
    except secfed.SecfedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    done = [r for r in reports if r.status == "done"]
    print(json.dumps({"rounds_done": len(done), "epsilon": done[-1].epsilon if done else None,
                      "metrics": done[-1].metrics if done else None}), flush=True)
    return 0 if done else 1


if __name__ == "__main__":
    sys.exit(main())
