"""The pure pieces of ``bench/contribution_ranking.py`` (issue 17, target I): Spearman against
hand-computed values, exactly 40 % flipped labels, the free rider's update is DP noise alone,
the leave-one-out replay and the macro-F1."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from contribution_ranking import (  # noqa: E402
    NoiseOnlyTrainer,
    accuracy_and_macro_f1,
    fedavg_replay,
    flip_labels,
    later_and_rest,
    share_against_others,
    share_along,
    spearman,
    two_lowest,
)

from secfed.training import DPConfig  # noqa: E402


def test_spearman_matches_hand_computed_values() -> None:
    # ranks 1,4,2,3,5 against 1,3,2,5,4: sum d^2 = 6, rho = 1 - 6 * 6 / (5 * 24) = 0.7
    assert spearman([0.1, 0.4, 0.2, 0.3, 0.5], [10, 30, 20, 50, 40]) == pytest.approx(0.7)
    # a tie: ranks (1, 2, 3, 4) against (1, 2.5, 2.5, 4), Pearson = 4.5 / sqrt(5 * 4.5)
    assert spearman([1, 2, 3, 4], [1, 2, 2, 3]) == pytest.approx(4.5 / math.sqrt(22.5))
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


@pytest.mark.parametrize("n", [100, 159, 4240])
def test_flip_labels_moves_exactly_forty_percent_to_other_classes(n: int) -> None:
    labels = torch.arange(n) % 7
    flipped = flip_labels(labels, fraction=0.4, n_classes=7, seed=3)
    changed = flipped != labels
    assert int(changed.sum()) == round(0.4 * n)
    assert int(flipped.min()) >= 0 and int(flipped.max()) <= 6
    assert torch.equal(labels, torch.arange(n) % 7)  # the input is left alone
    assert torch.equal(flipped, flip_labels(labels, fraction=0.4, n_classes=7, seed=3))
    assert not torch.equal(flipped, flip_labels(labels, fraction=0.4, n_classes=7, seed=4))
    if n >= 1000:  # the new class is uniform over the 6 others: every shift appears
        shifts = ((flipped - labels) % 7)[changed]
        counts = torch.bincount(shifts, minlength=7)
        assert counts[0] == 0 and int(counts[1:].min()) > 0.1 * int(changed.sum())


class _Head(nn.Module):
    def __init__(self, d_in: int, classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(d_in, classes)

    def forward(self, input_ids, **_):
        return self.linear(input_ids)


class _Records(torch.utils.data.Dataset):
    """Records whose gradients are large and all alike; remembers every index read."""

    def __init__(self, n: int, d_in: int) -> None:
        self.reads: list[int] = []
        self.x = torch.full((n, d_in), 5.0)
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        self.reads.append(i)
        return {"input_ids": self.x[i], "labels": torch.tensor(0)}


def test_free_rider_update_is_the_dp_noise_alone() -> None:
    torch.manual_seed(0)
    d_in, classes, n = 999, 10, 200  # 10,000 parameters
    model, data = _Head(d_in, classes), _Records(n, d_in)
    sigma, clip, q, steps, lr = 1.3, 1.0, 0.1, 4, 0.5
    config = DPConfig(noise_multiplier=sigma, sample_rate=q, local_steps=steps,
                      max_grad_norm=clip, learning_rate=lr, optimizer="sgd")
    result = NoiseOnlyTrainer(model, data, config=config).train()
    assert data.reads == []  # no record is ever read: no signal can enter
    assert result.steps == steps
    delta = result.delta.astype(np.float64)
    # SGD over empty batches: delta = -lr * sum_t z_t / (q N), z_t ~ N(0, sigma^2 C^2) per
    # coordinate; the sample variance of 10,000 coordinates has a relative s.d. of 1.4 %
    expected = (lr * sigma * clip / (q * n)) ** 2 * steps
    assert delta.var() == pytest.approx(expected, rel=0.06)
    assert abs(delta.mean()) < 4 * math.sqrt(expected / delta.size)


def test_fedavg_replay_and_two_lowest() -> None:
    start = np.array([1.0, 1.0], dtype=np.float32)
    rounds = [[np.array([1.0, 0.0]), np.array([3.0, 2.0]), np.array([5.0, 4.0])],
              [np.array([0.0, 1.0]), np.array([0.0, 0.0]), np.array([2.0, 3.0])]]
    assert fedavg_replay(start, rounds, [0, 2]).tolist() == [1.0 + 3.0 + 1.0, 1.0 + 2.0 + 2.0]
    assert fedavg_replay(start, rounds, [1]).tolist() == [4.0, 3.0]
    assert two_lowest({"a": 0.3, "b": 0.1, "c": 0.25, "d": 0.2}) == {"b", "d"}


def test_accuracy_and_macro_f1_by_hand() -> None:
    truth = np.array([0, 0, 1, 1, 2])
    predicted = np.array([0, 1, 1, 1, 0])
    acc, f1 = accuracy_and_macro_f1(predicted, truth, 3)
    # class 0: 2*1 / (2*1 + 1 + 1) = 0.5; class 1: 2*2 / (2*2 + 1) = 0.8; class 2: 0
    assert acc == pytest.approx(0.6)
    assert f1 == pytest.approx((0.5 + 0.8 + 0.0) / 3)


def test_share_against_others_is_the_share_less_its_self_term() -> None:
    u = [np.array([1.0, 0.0, 2.0]), np.array([0.5, 1.0, -1.0]), np.array([0.0, 3.0, 1.0])]
    total = u[0] + u[1] + u[2]  # (1.5, 4, 2), ||U||^2 = 22.25
    # <u_0, U - u_0> = <(1,0,2), (0.5,4,0)> = 0.5
    assert share_against_others(u, 0) == pytest.approx(0.5 / 22.25)
    for i in range(3):
        share = float(u[i] @ total / (total @ total))
        assert share_against_others(u, i) == pytest.approx(share - float(u[i] @ u[i]) / 22.25)


def test_share_along_is_the_projection_coefficient() -> None:
    v = np.array([3.0, 4.0, 0.0])  # ||v||^2 = 25
    assert share_along(np.array([1.0, 2.0, 5.0]), v) == pytest.approx(11 / 25)
    assert share_along(2.5 * v, v) == pytest.approx(2.5)
    assert share_along(np.array([4.0, -3.0, 7.0]), v) == pytest.approx(0.0)


def test_later_and_rest_use_only_the_other_rounds_aggregates() -> None:
    # 3 rounds, 2 sites in 2-d; round r's aggregate is the sum of its updates
    recorded = [[np.array([1.0, 0.0]), np.array([0.0, 1.0])],
                [np.array([2.0, 0.0]), np.array([0.0, 0.0])],
                [np.array([0.0, 3.0]), np.array([1.0, 1.0])]]
    totals = [a + b for a, b in recorded]
    later, rest = later_and_rest(recorded, totals, ["a", "b"])
    # later: round 1 along U2 + U3 = (3, 4); round 2 along U3 = (1, 4); round 3 has none
    assert later["a"] == pytest.approx(np.mean([3 / 25, 2 / 17]))
    assert later["b"] == pytest.approx(np.mean([4 / 25, 0.0]))
    # rest: round 1 along U2 + U3 = (3, 4); round 2 along U1 + U3 = (2, 5); round 3 along
    # U1 + U2 = (3, 1)
    assert rest["a"] == pytest.approx(np.mean([3 / 25, 4 / 29, 3 / 10]))
    assert rest["b"] == pytest.approx(np.mean([4 / 25, 0.0, 4 / 10]))
