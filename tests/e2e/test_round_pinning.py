"""A site refuses any round the coordinator announces differently from the site's pinned
``federation.toml`` -- mode against the schedule, k, t, min_participants, clip, ring, scale,
roster and the DP terms -- naming the field, before any secret exists (issue 20, items 1 and 6).

The announcements come from a real :class:`Coordinator` built from the coordinator's kit (no
network); the site is a real :class:`Participant` on its enterprise kit.
"""

from __future__ import annotations

import dataclasses
import re
import sqlite3
from pathlib import Path

import pytest

from secfed.config import DistributedDPSettings, DPSettings, load_federation
from secfed.coordinator.service import Coordinator
from secfed.errors import ConfigError, ProtocolAbort
from secfed.federation.kits import CoordinatorKit, EnterpriseKit, create_kits
from secfed.federation.plan import model_settings_for
from secfed.participant.adapter import SyntheticSite
from secfed.participant.loop import Participant
from secfed.protocol import ParticipantRound, RoundSpec
from secfed.transport.api import RoundInfo

SITES = [f"site-{i:02d}" for i in range(12)]
ME = "site-00"


@pytest.fixture(scope="module")
def fed12(tmp_path_factory: pytest.TempPathFactory):
    """12 enterprises, schedule secagg, secagg+ (k = protocol default 10), sigma pinned."""
    return create_kits(
        tmp_path_factory.mktemp("pin") / "fed", name="pin", enterprises=SITES,
        coordinator_url="https://127.0.0.1:8443",
        model=model_settings_for(model_dir=None, synthetic_dim=16),
        mode_schedule=("secagg", "secagg+"), rounds=4,
        dp=DPSettings(noise_multiplier=1.0, sample_rate=0.01, local_steps=5),
    )


def _participant(root: Path, **policy: object) -> Participant:
    kit = EnterpriseKit.load(root)
    if policy:
        kit = dataclasses.replace(kit, policy=kit.policy.model_copy(update=policy))
    return Participant(kit, SyntheticSite(kit.root, kit.enterprise_id, kit.federation.model),
                       new_ledger=True)


def _info(spec: RoundSpec, terms) -> RoundInfo:
    return RoundInfo(round_number=spec.round_number, status="open", stage="advertise",
                     spec_hex=spec.to_bytes().hex(), terms=terms)


def _nothing_left_the_site(p: Participant) -> None:
    """No key, share or update left, nothing was charged; the one thing a refusing site may
    send is its signed refusal (issue 22 item 6: it tells the coordinator why)."""
    db = sqlite3.connect(p.kit.state)
    sent = db.execute("SELECT stage, protection FROM outbound").fetchall()
    assert sent in ([], [("refusal", "signed")]), sent
    assert p.ledger.epsilon() == 0.0


def test_honest_announcements_are_accepted(fed12) -> None:
    coordinator = Coordinator(CoordinatorKit.load(fed12.coordinator))
    p = _participant(fed12.enterprises[ME])
    try:
        for r, mode in ((1, "secagg"), (2, "secagg+"), (3, "secagg")):
            spec, terms, hook = p._check(_info(coordinator._spec(r), coordinator.terms(r)))
            assert spec.mode == mode and hook is None
            assert terms.threshold == spec.threshold  # the Shamir threshold actually used
        assert (coordinator._spec(2).neighbours, coordinator._spec(2).threshold) == (10, 7)
        _nothing_left_the_site(p)
    finally:
        p.close()


# (round, spec changes, terms changes, the field the refusal must name). Round 1 is secagg
# (t = 8 = min_participants), round 2 secagg+ (k = 10, t = 7 per neighbourhood, min 9); the
# kit picked ring_bits 32 for n = 12, scale 24, clip 8.
SPEC_CASES = [
    (1, dict(mode="ckks", threshold=0, min_participants=2), dict(mode="ckks", threshold=0,
                                                               min_participants=2), "mode"),
    (2, dict(mode="secagg", neighbours=0, threshold=9), dict(mode="secagg", threshold=9), "mode"),
    (2, dict(neighbours=2, threshold=2), dict(threshold=2), "neighbours"),  # the grinding attack
    (2, dict(neighbours=8, threshold=7), dict(threshold=7), "neighbours"),
    (1, dict(threshold=7), dict(threshold=7), "threshold"),
    (1, dict(threshold=10), dict(threshold=10), "threshold"),
    (2, dict(threshold=9), dict(threshold=9), "threshold"),
    (1, dict(min_participants=12), dict(min_participants=12), "min_participants"),
    (2, dict(min_participants=12), dict(min_participants=12), "min_participants"),
    (1, dict(clip_bound=16.0), {}, "clip_bound"),
    (1, dict(ring_bits=64), {}, "ring_bits"),
    (1, dict(scale_bits=20), {}, "scale_bits"),
    (1, dict(participants=tuple(SITES[:11]), threshold=8, min_participants=8),
     dict(participants=tuple(SITES[:11]), threshold=8, min_participants=8), "participants"),
]
TERMS_CASES = [
    (dict(noise_multiplier=0.6), "noise_multiplier"),  # above the site's floor 0.5: only the pin
    (dict(sample_rate=0.02), "sample_rate"),
    (dict(local_steps=10), "local_steps"),
    (dict(max_grad_norm=2.0), "max_grad_norm"),
    (dict(delta=1e-6), "delta"),
    (dict(learning_rate=0.5), "learning_rate"),
    (dict(optimizer="adam"), "optimizer"),
    (dict(threshold=10), "threshold"),  # terms' threshold must be the spec's (Shamir's)
    (dict(min_participants=10), "min_participants"),
    (dict(distributed_dp=DistributedDPSettings(min_participants=3)), "distributed_dp"),
]


@pytest.fixture(scope="module")
def announcer(fed12):
    return Coordinator(CoordinatorKit.load(fed12.coordinator))


@pytest.mark.parametrize("r, spec_changes, terms_changes, field", SPEC_CASES,
                         ids=[f"{c[3]}-{i}" for i, c in enumerate(SPEC_CASES)])
def test_spec_differing_from_federation_toml_is_refused_naming_the_field(
        fed12, announcer, r, spec_changes, terms_changes, field) -> None:
    honest = announcer._spec(r)
    spec = dataclasses.replace(honest, **spec_changes)
    spec.validate()
    terms = announcer.terms(r).model_copy(update=terms_changes)
    p = _participant(fed12.enterprises[ME])
    try:
        with pytest.raises(ConfigError, match=re.escape(
                f"round spec {field} must be {getattr(honest, field)!r} as federation.toml pins it")):
            p._check(_info(spec, terms))
        _nothing_left_the_site(p)
    finally:
        p.close()


@pytest.mark.parametrize("terms_changes, field", TERMS_CASES, ids=[c[1] for c in TERMS_CASES])
def test_terms_differing_from_federation_toml_are_refused_naming_the_field(
        fed12, announcer, terms_changes, field) -> None:
    terms = announcer.terms(1).model_copy(update=terms_changes)
    p = _participant(fed12.enterprises[ME])
    try:
        with pytest.raises(ConfigError, match=rf"round terms {field} must be .* as "
                                              "federation.toml pins it"):
            p._check(_info(announcer._spec(1), terms))
        _nothing_left_the_site(p)
    finally:
        p.close()


def test_grinding_attack_spec_is_refused_by_the_site_before_any_secret(fed12) -> None:
    """The attack script's announcement (k = 2, t = 2 for n = 12) against a federation whose
    federation.toml leaves k at the protocol default: the round is refused, nothing is sent."""
    coordinator = Coordinator(CoordinatorKit.load(fed12.coordinator))
    p = _participant(fed12.enterprises["site-05"])
    try:
        spec = dataclasses.replace(coordinator._spec(2), neighbours=2, threshold=2)
        report = p._round(_info(spec, coordinator.terms(2).model_copy(update=dict(threshold=2))))
        assert report.status == "refused"
        assert "round spec neighbours must be 10" in report.detail
        _nothing_left_the_site(p)
        # and the protocol policy the site hands its state machine refuses it too, keyless
        machine = ParticipantRound(spec, me=p.me, identity=p.identity, roster=p.roster,
                                   policy=p._policy(spec))
        with pytest.raises(ProtocolAbort, match="neighbours must be 10 as the federation pinned"):
            machine.start()
        assert machine._cipher_keys is None and machine._mask_keys is None
    finally:
        p.close()


def test_federation_pinned_to_secagg_cannot_be_switched_to_ckks(tmp_path: Path) -> None:
    kits = create_kits(
        tmp_path / "fed", name="sa", enterprises=SITES[:4],
        coordinator_url="https://127.0.0.1:8443",
        model=model_settings_for(model_dir=None, synthetic_dim=16), mode_schedule=("secagg",),
        dp=DPSettings(noise_multiplier=1.0, sample_rate=0.01, local_steps=5),
    )
    coordinator = Coordinator(CoordinatorKit.load(kits.coordinator))
    honest, terms = coordinator._spec(1), coordinator.terms(1)
    ckks = dataclasses.replace(honest, mode="ckks", threshold=0, neighbours=0)
    ckks.validate()
    ckks_terms = terms.model_copy(update=dict(mode="ckks", threshold=0))
    # the site's default allowed modes are the scheduled ones: no ckks
    site = EnterpriseKit.load(kits.enterprises[ME])
    assert site.policy.allowed_modes is None
    assert site.policy.modes(site.federation.mode_schedule) == ("secagg",)
    # an older site.toml that still lists ckks: the schedule pin refuses the switch anyway
    for policy in ({}, {"allowed_modes": ("secagg", "secagg+", "ckks")}):
        p = _participant(kits.enterprises[ME], **policy)
        try:
            p._check(_info(honest, terms))
            with pytest.raises(ConfigError, match="round spec mode must be 'secagg' as "
                                                  "federation.toml pins it for round 1"):
                p._check(_info(ckks, ckks_terms))
            report = p._round(_info(ckks, ckks_terms))
            assert report.status == "refused" and "mode must be 'secagg'" in report.detail
            _nothing_left_the_site(p)
            machine = ParticipantRound(ckks, me=p.me, identity=p.identity, roster=p.roster,
                                       policy=p._policy(ckks))
            with pytest.raises(ProtocolAbort, match="mode must be"):
                machine.start()
        finally:
            p.close()
        (kits.enterprises[ME] / "state.sqlite").unlink()
    assert _participant(kits.enterprises[ME])._policy(honest).allowed_modes == ("secagg",)


def test_site_min_threshold_is_checked_against_the_shamir_threshold(fed12) -> None:
    """Round 2 is secagg+ with k = 10: Shamir rebuilds a seed from t = 7 of 11 neighbours (holders
    besides a responder, issue 20). The coordinator used to announce the federation's t = 8 in the
    terms, which a site demanding min_threshold = 8 accepted; it now announces the real t = 7 and
    the site refuses."""
    coordinator = Coordinator(CoordinatorKit.load(fed12.coordinator))
    assert load_federation(fed12.coordinator / "federation.toml").threshold == 8
    p = _participant(fed12.enterprises["site-07"], min_threshold=8)
    try:
        p._check(_info(coordinator._spec(1), coordinator.terms(1)))  # secagg: t = 8, accepted
        spec, terms = coordinator._spec(2), coordinator.terms(2)
        assert spec.threshold == terms.threshold == 7
        with pytest.raises(ConfigError, match=r"threshold must be in \[8, 12\] by site policy "
                                              r"\(got 7\)"):
            p._check(_info(spec, terms))
        # terms claiming 8 while the spec's Shamir threshold is 7: refused as differing
        with pytest.raises(ConfigError, match="round terms threshold must be 7"):
            p._check(_info(spec, terms.model_copy(update=dict(threshold=8))))
        # the protocol policy the site builds checks the spec's threshold itself
        policy = p._policy(spec)
        assert policy.min_threshold == 8
        with pytest.raises(ProtocolAbort, match=r"threshold must be >= 8 by site policy"):
            policy.check(spec, me=p.me, roster=p.roster)
        _nothing_left_the_site(p)
    finally:
        p.close()


def test_coordinator_announcements_are_what_sites_pin(tmp_path: Path) -> None:
    """The coordinator's construction and the sites' pinned expectation agree, for every mode,
    an explicit k, and a calibrated sigma (so an honest federation is never refused)."""
    from secfed.participant.pinning import check_pinned, pinned_noise_multiplier

    kits = create_kits(
        tmp_path / "fed", name="all", enterprises=SITES,
        coordinator_url="https://127.0.0.1:8443",
        model=model_settings_for(model_dir=None, synthetic_dim=16),
        mode_schedule=("secagg", "secagg+", "ckks"), rounds=3,
        dp=DPSettings(sample_rate=0.01, local_steps=5, lr_schedule="cosine"),
    )
    fed = load_federation(kits.coordinator / "federation.toml")
    assert fed.dp.noise_multiplier is None  # calibrated on both sides
    sigma = pinned_noise_multiplier(fed)
    for neighbours in (0, 6):
        kit = CoordinatorKit.load(kits.coordinator)
        kit = dataclasses.replace(kit, federation=fed.model_copy(update={"neighbours": neighbours}))
        coordinator = Coordinator(kit)
        for r in (1, 2, 3, 4):
            spec, terms = coordinator._spec(r), coordinator.terms(r)
            assert terms.noise_multiplier == sigma
            assert check_pinned(kit.federation, spec, terms, noise_multiplier=sigma).mode == spec.mode
            if spec.mode == "secagg+":
                assert spec.neighbours == (neighbours or 10)


def test_every_round_spec_field_is_pinned_or_named_unpinned() -> None:
    from secfed.participant.pinning import PINNED_SPEC_FIELDS, UNPINNED_SPEC_FIELDS

    fields = [f.name for f in dataclasses.fields(RoundSpec)]
    assert sorted(PINNED_SPEC_FIELDS + UNPINNED_SPEC_FIELDS) == sorted(fields)
