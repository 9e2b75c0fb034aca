"""Wire messages: exact round trips, and every decoder fuzzed (only MessageFormatError escapes)."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from secfed.errors import MessageFormatError
from secfed.protocol import RoundSpec, decode_message
from secfed.protocol.messages import (
    MESSAGE_TYPES,
    AdvertiseKeys,
    CkksAggregate,
    CkksUpload,
    CoinReveal,
    ConsistencyRequest,
    ConsistencySignature,
    ContributionReport,
    ForwardedShares,
    KeyRoster,
    MaskedAggregate,
    MaskedUpload,
    NeighbourRoster,
    ProbeReport,
    ProbeRequest,
    RosterCommitment,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
)

SID = bytes(range(32))
SIG = bytes(64)
ADV = AdvertiseKeys(7, SID, "org-a", os.urandom(32), os.urandom(32), SIG)
SAMPLES = [
    ADV,
    AdvertiseKeys(7, SID, "org-ckks", b"", b"", SIG),
    AdvertiseKeys(7, SID, "org-plus", os.urandom(32), os.urandom(32), SIG, os.urandom(32)),
    CoinReveal(7, SID, "org-a", os.urandom(32)),
    RosterCommitment(7, b"\xa0\x40", os.urandom(32), os.urandom(32), (os.urandom(32), os.urandom(32))),
    RosterCommitment(7, b"\x80", os.urandom(32), os.urandom(32), ()),
    NeighbourRoster(7, SID, (os.urandom(32), os.urandom(32), os.urandom(32)),
                    ((AdvertiseKeys(7, SID, "org-b", os.urandom(32), os.urandom(32), SIG, os.urandom(32)),
                      (os.urandom(32),) * 4),)),
    KeyRoster(7, (ADV, AdvertiseKeys(7, SID, "org-b", os.urandom(32), os.urandom(32), SIG))),
    ShareKeys(7, SID, "org-a", os.urandom(32), (("org-b", os.urandom(98)), ("org-c", os.urandom(98)))),
    ForwardedShares(7, SID, "org-b", (("org-a", os.urandom(98)),)),
    MaskedUpload(7, SID, "org-a", b"ledger-head", 64, os.urandom(8 * 5), SIG),
    MaskedUpload(7, SID, "org-a", b"", 32, os.urandom(4 * 5), SIG),
    CkksUpload(7, SID, "org-a", b"head", (b"ct0", b"ct-one"), SIG),
    ConsistencyRequest(7, SID, ("org-a", "org-b", "ünïcode")),
    ConsistencySignature(7, SID, "org-a", SIG),
    UnmaskRequest(7, SID, ("org-a", "org-b"), (("org-a", SIG),), ("org-a",), ("org-c",)),
    UnmaskResponse(7, SID, "org-a", (("org-a", 0, os.urandom(35)), ("org-c", 1, os.urandom(35)))),
    MaskedAggregate(7, SID, ("org-a", "org-b"), 64, os.urandom(16)),
    CkksAggregate(7, SID, (("org-a", b"h", (b"ct0", b"ct1"), SIG), ("org-b", b"", (), SIG))),
    ProbeRequest(7, SID, 3, (("org-a", os.urandom(32)), ("org-b", os.urandom(32)))),
    ProbeReport(7, SID, "org-a", (1, 2**64 - 1, 5), (("org-b", (0, 7, 9)), ("org-c", (3, 3, 3)))),
    ContributionReport(7, SID, "org-a", (("org-b", 2**63), ("org-c", 0))),
]
SPEC = RoundSpec.create(
    federation="fed", round_number=3, mode="secagg+", participants=[f"p{i}" for i in range(12)],
    vector_length=1000, clip_bound=1.5, global_hash="ab" * 32,
)
PROBED_SPEC = RoundSpec.create(
    federation="fed", round_number=3, mode="secagg", participants=[f"p{i}" for i in range(5)],
    vector_length=1000, clip_bound=1.5, probes=32,
)
ENCODED = [m.to_bytes() for m in SAMPLES] + [SPEC.to_bytes(), PROBED_SPEC.to_bytes()]


def test_every_message_type_is_covered() -> None:
    assert {type(m) for m in SAMPLES} == set(MESSAGE_TYPES.values())


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(message) -> None:
    data = message.to_bytes()
    assert decode_message(data) == message
    assert type(message).from_bytes(data) == message
    assert data[0] == 1  # version byte first


def test_spec_round_trip_and_digest() -> None:
    again = RoundSpec.from_bytes(SPEC.to_bytes())
    assert again == SPEC and again.digest() == SPEC.digest()
    other = RoundSpec.create(
        federation="fed", round_number=4, mode="secagg+", participants=SPEC.participants,
        vector_length=1000, clip_bound=1.5, global_hash="ab" * 32,
    )
    assert other.digest() != SPEC.digest()


def test_from_bytes_checks_the_type() -> None:
    with pytest.raises(MessageFormatError, match="must be ShareKeys"):
        ShareKeys.from_bytes(ADV.to_bytes())


@pytest.mark.parametrize(
    "data, rule",
    [
        (b"", "truncated"),
        (b"\x02" + ADV.to_bytes()[1:], "version"),
        (b"\x01\x63" + bytes(8), "type"),
        (ADV.to_bytes() + b"\x00", "trailing"),
        (ADV.to_bytes()[:-1], "truncated"),
    ],
)
def test_malformed_messages_name_the_rule(data: bytes, rule: str) -> None:
    with pytest.raises(MessageFormatError, match=rule):
        decode_message(data)


def _decode_any(data: bytes) -> None:
    try:
        decode_message(data)
    except MessageFormatError:
        pass
    try:
        RoundSpec.from_bytes(data)
    except MessageFormatError:
        pass


def _mutate(data: bytes, ops: list[tuple[int, int, int]]) -> bytes:
    buf = bytearray(data)
    for kind, pos, value in ops:
        if not buf:
            break
        pos %= len(buf)
        if kind == 0:
            buf[pos] = value
        elif kind == 1:
            del buf[pos:]
        else:
            buf[pos:pos] = bytes([value])
    return bytes(buf)


MUTATIONS = st.lists(
    st.tuples(st.integers(0, 2), st.integers(0, 1 << 20), st.integers(0, 255)), min_size=1, max_size=4
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=300))
def test_fuzz_random_bytes(data: bytes) -> None:
    _decode_any(data)
    _decode_any(b"\x01" + bytes([data[0] % 14 if data else 1]) + data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(which=st.integers(0, len(ENCODED) - 1), ops=MUTATIONS)
def test_fuzz_mutated_messages(which: int, ops) -> None:
    _decode_any(_mutate(ENCODED[which], ops))


@pytest.mark.slow
@settings(max_examples=10_000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=400))
def test_fuzz_random_bytes_10k(data: bytes) -> None:
    _decode_any(data)
    _decode_any(b"\x01" + bytes([data[0] % 14 if data else 1]) + data)


@pytest.mark.slow
@settings(max_examples=10_000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(which=st.integers(0, len(ENCODED) - 1), ops=MUTATIONS)
def test_fuzz_mutated_messages_10k(which: int, ops) -> None:
    _decode_any(_mutate(ENCODED[which], ops))
