"""The DP-SGD terms are one type: RoundTerms carries them, the trainer takes them, the ledger
charges them; the coordinator's and the site's terms come from DPSettings.sgd_terms."""

from __future__ import annotations

import dataclasses

import pytest

from secfed.config import (
    DPSGD_FIELDS,
    DPSettings,
    DPSGDTerms,
    FederationConfig,
    ModelSettings,
    RosterEntry,
    RoundTerms,
)
from secfed.crypto.keys import IdentityKey
from secfed.errors import ConfigError
from secfed.privacy import DPSGDEvent

DP = DPSGDTerms(noise_multiplier=1.3, sample_rate=0.02, local_steps=7, max_grad_norm=0.5,
                learning_rate=0.1, optimizer="adam")
REST = dict(round_number=2, mode="secagg", participants=("a", "b", "c"), threshold=2,
            min_participants=2, delta=1e-5)


def test_round_terms_carry_the_dp_sgd_terms_on_the_wire_unchanged() -> None:
    terms = RoundTerms.of(DP, **REST)
    assert terms.dp_sgd == DP
    wire = terms.model_dump()
    assert {name: wire[name] for name in DPSGD_FIELDS} == dataclasses.asdict(DP)  # flat, as before
    assert RoundTerms.model_validate_json(terms.model_dump_json()).dp_sgd == DP
    assert set(DPSGD_FIELDS) <= set(RoundTerms.model_fields)


def test_trainer_and_ledger_take_the_terms() -> None:
    from secfed.training import DPConfig

    config = DPConfig.of(DP)
    assert isinstance(config, DPSGDTerms) and not config.allow_zero_noise
    assert all(getattr(config, f) == getattr(DP, f) for f in DPSGD_FIELDS)
    assert DPSGDEvent.of(DP) == DPSGDEvent(noise_multiplier=1.3, sample_rate=0.02, steps=7)
    with pytest.raises(ConfigError, match="noise_multiplier must be > 0"):
        DPSGDTerms(noise_multiplier=0.0, sample_rate=0.1, local_steps=1)
    assert DPConfig(noise_multiplier=0.0, sample_rate=0.1, local_steps=1,
                    allow_zero_noise=True).noise_multiplier == 0.0
    with pytest.raises(ConfigError, match="optimizer"):
        DPSGDTerms(noise_multiplier=1.0, sample_rate=0.1, local_steps=1, optimizer="adagrad")


def test_coordinator_and_site_build_the_same_terms_from_the_settings() -> None:
    from secfed.participant.pinning import pinned_terms

    ids = ("a", "b", "c")
    roster = tuple(RosterEntry(id=i, identity_public_key=IdentityKey.generate().public_bytes().hex())
                   for i in ids)
    dp = DPSettings(lr_schedule="cosine", learning_rate=0.2, local_steps=3, optimizer="adam")
    fed = FederationConfig(name="f", coordinator_url="https://127.0.0.1:8443", roster=roster,
                           coordinator_identity_public_key=IdentityKey.generate().public_bytes().hex(),
                           threshold=2, min_participants=2, rounds=4, dp=dp,
                           model=ModelSettings(vector_length=8, initial_global_hash="0"))
    for r in (1, 3):
        got = pinned_terms(fed, r, noise_multiplier=0.9).dp_sgd
        assert got == dp.sgd_terms(r, 4, noise_multiplier=0.9)
        assert got.learning_rate == dp.round_learning_rate(r, 4) and got.optimizer == "adam"
        assert (got.sample_rate, got.local_steps, got.max_grad_norm) == (0.05, 3, 1.0)
    assert pinned_terms(fed, 3, noise_multiplier=0.9).learning_rate < 0.2  # cosine decayed
