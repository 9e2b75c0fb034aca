"""The protocol-level participant policy: the SecAgg+ degree floor, the Shamir-threshold floor and
the federation's pinned round parameters are all refused in ``start()``, before any secret exists
(issue 20, items 1 and 6)."""

from __future__ import annotations

import dataclasses
import re

import pytest

from secfed.crypto.keys import IdentityKey
from secfed.errors import ProtocolAbort
from secfed.protocol import ParticipantPolicy, ParticipantRound, RoundSpec, default_neighbours

IDS = tuple(f"org-{i}" for i in range(12))
VICTIM = "org-0"


def _party(spec: RoundSpec, policy: ParticipantPolicy) -> ParticipantRound:
    identity = IdentityKey.generate()
    roster = {p: IdentityKey.generate().public_bytes() for p in spec.participants}
    roster[VICTIM] = identity.public_bytes()
    return ParticipantRound(spec, me=VICTIM, identity=identity, roster=roster, policy=policy)


def _no_secret(party: ParticipantRound) -> bool:
    return party._cipher_keys is None and party._mask_keys is None and party._self_seed is None


def _refused(spec: RoundSpec, policy: ParticipantPolicy, rule: str) -> None:
    party = _party(spec, policy)
    with pytest.raises(ProtocolAbort, match=rule) as info:
        party.start()
    assert info.value.stage == "advertise"
    assert _no_secret(party)


def test_default_policy_refuses_the_graph_grinding_attack_spec() -> None:
    """/work/shared/attacks/secaggplus_graph_grinding.py: the coordinator announces k = 2 for
    n = 12 (t = 3), which let 2 colluders become the victim's only neighbours after ~15 tries and
    recover its update exactly. The protocol's default policy now needs k >= default_neighbours(n)."""
    spec = RoundSpec.create(federation="f", round_number=7, mode="secagg+", participants=IDS,
                            vector_length=16, neighbours=2)
    assert (spec.neighbours, spec.threshold) == (2, 2)  # t = 2 holders besides each responder
    assert default_neighbours(12) == 10
    with pytest.raises(ProtocolAbort, match=r"neighbours must be >= 10 for n = 12 \(got 2\)"):
        ParticipantPolicy().check(spec, me=VICTIM, roster={p: b"k" for p in IDS})
    _refused(spec, ParticipantPolicy(), r"neighbours must be >= 10")
    # every k below the default is refused by default; the default itself is accepted
    for k in (2, 4, 6, 8):
        _refused(RoundSpec.create(federation="f", round_number=7, mode="secagg+", participants=IDS,
                                  vector_length=16, neighbours=k), ParticipantPolicy(), "neighbours")
    honest = RoundSpec.create(federation="f", round_number=7, mode="secagg+", participants=IDS,
                              vector_length=16)
    assert honest.neighbours == 10
    _party(honest, ParticipantPolicy()).start()
    # a caller may lower the floor explicitly (a federation that pinned a smaller k)
    _party(spec, ParticipantPolicy(min_neighbours=2)).start()


def _pinned(spec: RoundSpec) -> dict[str, object]:
    return {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec) if f.name != "global_hash"}


SECAGG = RoundSpec.create(federation="f", round_number=3, mode="secagg", participants=IDS,
                          vector_length=16, clip_bound=8.0, ring_bits=64)
SECAGG_PLUS = RoundSpec.create(federation="f", round_number=3, mode="secagg+", participants=IDS,
                               vector_length=16, clip_bound=8.0, ring_bits=64)


@pytest.mark.parametrize(
    "pinned, changes, field",
    [
        # a federation pinned to secagg switched to ckks (coordinator + 1 enterprise decrypt all)
        (SECAGG, dict(mode="ckks", threshold=0, neighbours=0, min_participants=2), "mode"),
        (SECAGG_PLUS, dict(mode="secagg", threshold=9, neighbours=0), "mode"),
        (SECAGG_PLUS, dict(neighbours=8), "neighbours"),
        (SECAGG, dict(threshold=10), "threshold"),  # even a higher t differs from the pin
        (SECAGG_PLUS, dict(threshold=9), "threshold"),
        (SECAGG, dict(min_participants=11), "min_participants"),
        (SECAGG, dict(clip_bound=16.0), "clip_bound"),
        (SECAGG, dict(ring_bits=32, clip_bound=1.0), "ring_bits"),
        (SECAGG, dict(scale_bits=20), "scale_bits"),
        (SECAGG, dict(vector_length=17), "vector_length"),
    ],
)
def test_spec_differing_from_the_pinned_one_is_refused_before_any_secret(
    pinned: RoundSpec, changes: dict[str, object], field: str
) -> None:
    policy = ParticipantPolicy(pinned=_pinned(pinned), min_neighbours=0)
    _party(pinned, policy).start()  # the pinned spec itself is accepted
    announced = dataclasses.replace(pinned, **changes)
    announced.validate()
    _refused(announced, policy, re.escape(f"{field} must be {getattr(pinned, field)!r} as the federation pinned"))


def test_min_threshold_is_checked_against_the_shamir_threshold() -> None:
    """SecAgg+ n = 12: k = 10, so the Shamir threshold is t = 7 of each 11-party neighbourhood
    (holders besides a responder; the federation-wide figure 8 is not what rebuilds a seed). A
    site asking for >= 8 refuses."""
    assert (SECAGG_PLUS.neighbours, SECAGG_PLUS.threshold) == (10, 7)
    _refused(SECAGG_PLUS, ParticipantPolicy(min_threshold=8),
             r"threshold must be >= 8 by site policy \(the Shamir threshold of 11 share holders; got 7\)")
    _party(SECAGG_PLUS, ParticipantPolicy(min_threshold=7)).start()
    assert SECAGG.threshold == 8
    _party(SECAGG, ParticipantPolicy(min_threshold=8)).start()
    _refused(SECAGG, ParticipantPolicy(min_threshold=9), "threshold must be >= 9 by site policy")
