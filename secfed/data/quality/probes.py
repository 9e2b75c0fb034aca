"""Confident learning's parts: out-of-fold softmax probes and a stacker that combines sources.

Each function fits small torch models (softmax regressions by L-BFGS) under a forked RNG, so a
check never moves the caller's torch random state.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["fit_probe", "log_softmax", "out_of_fold_log_probs", "stacked_posterior"]


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def out_of_fold_log_probs(x: np.ndarray, labels: np.ndarray, rows: np.ndarray, n_classes: int,
                           *, folds: int, seed: int, weight_decay: float,
                           judge: np.ndarray | None = None) -> np.ndarray:
    """Log class probabilities of ``rows`` from softmax probes trained on the other folds.

    Confident learning (Northcutt et al., JAIR 2021): a record's own label never votes for
    itself, so a wrong label shows up as a low out-of-fold probability. ``judge`` (rows that
    no probe trains on, e.g. records already suspected) get the mean of the fold probes'
    probabilities. Other rows (and every row when there are too few to split) get the flat
    distribution.
    """
    out = np.full((len(labels), n_classes), -np.log(n_classes))
    if len(rows) < folds * 2:
        return out
    order = np.random.default_rng(seed).permutation(rows)  # data shuffling only, not a secret
    xt = torch.from_numpy(x.astype(np.float32))
    yt = torch.from_numpy(labels.astype(np.int64))
    outside = np.setdiff1d(judge, rows) if judge is not None else np.empty(0, np.int64)
    outside_sum = np.zeros((len(outside), n_classes))
    for f in range(folds):
        held = order[f::folds]
        train = np.setdiff1d(order, held)
        mu = xt[train].mean(0)
        sd = xt[train].std(0).clamp(min=1e-6)
        probe = fit_probe((xt[train] - mu) / sd, yt[train], n_classes,
                           weight_decay=weight_decay)
        with torch.no_grad():
            out[held] = torch.log_softmax(probe((xt[held] - mu) / sd), -1).numpy()
            if len(outside):
                outside_sum += torch.softmax(probe((xt[outside] - mu) / sd), -1).numpy()
    if len(outside):
        out[outside] = np.log(outside_sum / folds)
    return out


def fit_probe(x: torch.Tensor, y: torch.Tensor, n_classes: int, *,
               weight_decay: float) -> torch.nn.Linear:
    """A softmax regression fitted by L-BFGS with an L2 penalty (deterministic start)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        probe = torch.nn.Linear(x.shape[1], n_classes)
    opt = torch.optim.LBFGS(probe.parameters(), lr=0.5, max_iter=50,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(probe(x), y) + (
            weight_decay * probe.weight.pow(2).sum())
        loss.backward()
        return loss

    opt.step(closure)
    return probe


def stacked_posterior(sources: list[np.ndarray], labels: np.ndarray, rows: np.ndarray,
                       n_classes: int) -> np.ndarray:
    """Posterior from per-source log-scores: ``softmax(sum_s w_s * score_s + b)``.

    The weights (non-negative) and class biases are fitted on ``rows`` against the given
    labels -- a handful of parameters, so the ~10 % wrong labels barely move them -- which
    calibrates each source and lets a weak one (few texts, a poor image tower) count little.
    """
    scores = torch.tensor(np.stack(sources), dtype=torch.float32)
    weight = torch.zeros(len(sources), requires_grad=True)
    bias = torch.zeros(n_classes, requires_grad=True)

    def logits(idx: torch.Tensor) -> torch.Tensor:
        w = torch.nn.functional.softplus(weight)[:, None, None]
        return (w * scores[:, idx]).sum(0) + bias

    if len(rows):
        idx = torch.from_numpy(rows.astype(np.int64))
        y = torch.from_numpy(labels[rows].astype(np.int64))
        opt = torch.optim.LBFGS([weight, bias], lr=0.5, max_iter=100,
                                line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(logits(idx), y) + 1e-3 * bias.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
    with torch.no_grad():
        return torch.softmax(logits(torch.arange(scores.shape[1])), -1).numpy()
