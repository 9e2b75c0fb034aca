"""The aggregate equals the plaintext sum of the survivors' inputs (within quantisation)."""

from __future__ import annotations

import numpy as np
import pytest

from secfed.errors import ConfigError, ProtocolAbort
from secfed.protocol import simulate

from .harness import make_updates, plain_sum

QUANT = 2.0**-24  # one participant's rounding error is at most half of this


def _check(updates, result) -> None:
    expected = plain_sum(updates, result.survivors)
    err = float(np.max(np.abs(result.aggregate - expected)))
    assert err <= len(result.survivors) * QUANT / 2 + 1e-12, err
    assert result.participants_agree


def test_secagg_refuses_two_participants() -> None:
    # t >= 2 holders besides each responder: a 2-party secagg round can never complete (and its
    # sum would hand each party the other's input).
    with pytest.raises(ConfigError, match="at least 3 for mode secagg"):
        simulate(make_updates(2, 8), mode="secagg")


@pytest.mark.parametrize("n", [3, 4, 10, 50])
def test_secagg_exact_sum(n: int) -> None:
    updates = make_updates(n, 257, seed=n)
    result = simulate(updates, mode="secagg")
    assert result.survivors == tuple(range(n))
    _check(updates, result)


def test_secagg_ring32_compact_mode() -> None:
    updates = make_updates(5, 1000, seed=1, scale=0.01)
    result = simulate(updates, mode="secagg", ring_bits=32, scale_bits=16)
    expected = plain_sum(updates, result.survivors)
    assert np.max(np.abs(result.aggregate - expected)) <= 5 * 2.0**-16
    assert result.bytes_per_participant["upload"] < 1000 * 4 + 200


def test_upload_is_eight_bytes_per_parameter() -> None:
    d = 10_000
    result = simulate(make_updates(3, d), mode="secagg")
    overhead = result.bytes_per_participant["upload"] - 8 * d
    assert 0 < overhead < 200


def test_secagg_plus_sum_with_dropouts() -> None:
    updates = make_updates(30, 300, seed=3)
    result = simulate(updates, mode="secagg+", dropouts={"share": [4], "upload": [7, 11]})
    assert result.neighbours < 29
    assert set(result.survivors) == set(range(30)) - {4, 7, 11}
    _check(updates, result)


@pytest.mark.slow
def test_secagg_plus_n100() -> None:
    updates = make_updates(100, 2000, seed=4)
    result = simulate(updates, mode="secagg+", dropouts={"upload": [1, 50, 99], "unmask": [3]})
    assert len(result.survivors) == 97
    _check(updates, result)


@pytest.mark.slow
@pytest.mark.parametrize("n", [3, 10, 50])
def test_secagg_d1e6(n: int) -> None:
    updates = make_updates(n, 1_000_000, seed=5)
    drops = {"upload": [1]} if n == 10 else None
    result = simulate(updates, mode="secagg", dropouts=drops)
    _check(updates, result)


def test_noise_hook_adds_into_the_sum() -> None:
    calls = []

    def hook(encoded, *, spec, me):
        calls.append(me)
        encoded += np.uint64(1 << spec.scale_bits)  # +1.0 in every coordinate, in the ring

    updates = make_updates(4, 50, seed=6)
    result = simulate(updates, mode="secagg", noise_hook=hook)
    assert len(calls) == 4
    np.testing.assert_allclose(result.aggregate, plain_sum(updates, range(4)) + 4.0, atol=1e-6)


def test_ckks_minimum_applies() -> None:
    with pytest.raises(ProtocolAbort, match="2 of 4 participants uploaded, below the threshold 3"):
        simulate(make_updates(4, 100), mode="ckks", threshold=3, dropouts={"upload": [0, 1]})
    with pytest.raises(ConfigError, match="do not exist in mode ckks"):
        simulate(make_updates(4, 100), mode="ckks", dropouts={"unmask": [0]})


def test_ckks_sum_excludes_dropouts() -> None:
    updates = make_updates(4, 5000, seed=7)
    result = simulate(updates, mode="ckks", dropouts={"upload": [2]})
    assert result.survivors == (0, 1, 3)
    np.testing.assert_allclose(result.aggregate, plain_sum(updates, result.survivors), atol=1e-5)
    assert result.participants_agree
