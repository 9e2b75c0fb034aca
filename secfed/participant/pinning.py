"""What this site's ``federation.toml`` pins for a round, and the check that the coordinator's
announcement (signed-by-nobody ``RoundSpec`` + ``RoundTerms``) is exactly that.

The coordinator is untrusted: it may announce a round whose mode differs from the federation's
schedule (a SecAgg federation switched to CKKS, where the coordinator plus one enterprise decrypts
every upload), a SecAgg+ degree small enough to grind the graph around a victim (k = 2 for
n = 12), a lower Shamir threshold, a wider clip, another ring or scale, or weaker DP terms. A site
recomputes every value from its own pinned copy of the federation settings -- the same
construction the coordinator uses -- and refuses any difference, naming the field, before the
round's first secret exists. Only ``global_hash`` is not pinned here: it is the site's own adapter
hash, checked in the join loop.
"""

from __future__ import annotations

from secfed.config import FederationConfig, RoundTerms
from secfed.errors import ConfigError
from secfed.protocol.spec import RoundSpec

__all__ = [
    "PINNED_SPEC_FIELDS",
    "UNPINNED_SPEC_FIELDS",
    "scheduled_modes",
    "pinned_spec",
    "pinned_noise_multiplier",
    "pinned_terms",
    "check_pinned",
]

#: Every RoundSpec field but ``global_hash`` (the site's own adapter hash, checked separately),
#: in the order a refusal names them: the graph degree before the threshold derived from it.
#: A new RoundSpec field must be added here or to UNPINNED_SPEC_FIELDS (a test checks).
PINNED_SPEC_FIELDS: tuple[str, ...] = (
    "federation", "round_number", "mode", "participants", "neighbours", "threshold",
    "min_participants", "vector_length", "scale_bits", "ring_bits", "clip_bound",
    "probes", "probe_margin", "probe_bound",
)
UNPINNED_SPEC_FIELDS: tuple[str, ...] = ("global_hash",)


def scheduled_modes(fed: FederationConfig) -> tuple[str, ...]:
    """The modes the federation's ``mode_schedule`` ever uses, in schedule order."""
    return tuple(dict.fromkeys(fed.mode_schedule))


def pinned_spec(fed: FederationConfig, round_number: int) -> RoundSpec:
    """The round spec ``federation.toml`` implies for ``round_number`` (``global_hash`` empty).

    Mode from the schedule; participants = the roster in order; ``secagg``: t and
    min_participants as pinned; ``secagg+``: k as pinned (0 = :func:`default_neighbours` of n),
    t = the protocol default for a neighbourhood of k + 1, min_participants the protocol default
    for n; ``ckks``: min_participants as pinned. Scale, ring and clip from ``[model]``.

    Raises:
        ConfigError: ``round_number`` < 1, or the pinned settings make no valid spec.
    """
    mode = fed.mode_for_round(round_number)
    m = fed.model
    return RoundSpec.create(
        federation=fed.name, round_number=round_number, mode=mode,
        participants=fed.enterprise_ids(), vector_length=m.vector_length,
        threshold=fed.threshold if mode == "secagg" else None,
        neighbours=(fed.neighbours or None) if mode == "secagg+" else None,
        min_participants=fed.min_participants if mode != "secagg+" else None,
        scale_bits=m.scale_bits, ring_bits=m.ring_bits, clip_bound=m.clip_bound,
        **fed.probe_settings(mode),
    )


def pinned_noise_multiplier(fed: FederationConfig) -> float:
    """σ as pinned (``dp.noise_multiplier``), or calibrated for the planned horizon exactly as
    the coordinator calibrates it (RDP, rounds × local steps). Deterministic: the same code on
    both sides gives the same float; pin σ in ``federation.toml`` if versions may differ.

    Raises:
        ConfigError: the target ε is unreachable, or calibration is unavailable.
    """
    if fed.dp.noise_multiplier is not None:
        return fed.dp.noise_multiplier
    from secfed.privacy import calibrate_noise

    return float(
        calibrate_noise(
            target_epsilon=fed.dp.target_epsilon, delta=fed.dp.delta,
            sample_rate=fed.dp.sample_rate, steps=fed.rounds * fed.dp.local_steps,
            accountant="rdp",
        )
    )


def pinned_terms(fed: FederationConfig, round_number: int, *, noise_multiplier: float) -> RoundTerms:
    """The round terms ``federation.toml`` implies: threshold and min_participants are the
    spec's (the Shamir threshold actually used), the DP terms are ``[dp]``'s."""
    spec = pinned_spec(fed, round_number)
    dp = fed.dp
    return RoundTerms.of(
        dp.sgd_terms(round_number, fed.rounds, noise_multiplier=noise_multiplier),
        round_number=round_number, mode=spec.mode, participants=spec.participants,
        threshold=spec.threshold, min_participants=spec.min_participants,
        delta=dp.delta, distributed_dp=dp.distributed,
    )


def _shown(value: object) -> object:
    dump = getattr(value, "model_dump", None)
    return dump() if callable(dump) else value


def check_pinned(fed: FederationConfig, spec: RoundSpec, terms: RoundTerms, *,
                 noise_multiplier: float) -> RoundSpec:
    """Refuse an announced round that differs from ``federation.toml`` in any pinned field.

    Returns the pinned spec (for the protocol policy).

    Raises:
        ConfigError: naming the first differing field, the pinned value and the value received.
    """
    want = pinned_spec(fed, spec.round_number)
    for name in PINNED_SPEC_FIELDS:
        got, pinned = getattr(spec, name), getattr(want, name)
        if got != pinned:
            raise ConfigError(
                f"round spec {name} must be {pinned!r} as federation.toml pins it for round "
                f"{spec.round_number} (got {got!r})"
            )
    expected = pinned_terms(fed, spec.round_number, noise_multiplier=noise_multiplier)
    for name in RoundTerms.model_fields:
        got, pinned = getattr(terms, name), getattr(expected, name)
        if got != pinned:
            raise ConfigError(
                f"round terms {name} must be {_shown(pinned)!r} as federation.toml pins it for "
                f"round {spec.round_number} (got {_shown(got)!r})"
            )
    return want
