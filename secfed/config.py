"""Federation settings: ``federation.toml`` and each site's ``site.toml`` <-> validated models.

The federation file is shared by every party (roster with pinned identity keys, coordinator URL,
round schedule, threshold, deadlines, DP settings). The site policy lives only in an enterprise's
own kit; it is the data owner's floor, and no round spec from the coordinator can weaken it
(:meth:`SitePolicy.check_round`).

Reading uses :mod:`tomllib`; writing uses the small explicit writer :func:`dump_toml` (strings,
numbers, booleans, lists of scalars, tables and arrays of tables -- all this file needs).
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from secfed.errors import BudgetExceeded, ConfigError
from secfed.names import FEATURE_SCOPES, MASK_MODES, MODES, default_threshold

__all__ = [
    "AggregationMode",
    "default_of",
    "FEATURE_SCOPES",
    "MODES",
    "RosterEntry",
    "Deadlines",
    "DPSettings",
    "DPSGDTerms",
    "DPSGD_FIELDS",
    "OPTIMIZERS",
    "DistributedDPSettings",
    "MASK_MODES",
    "ModelSettings",
    "FederationConfig",
    "SitePolicy",
    "RoundTerms",
    "default_threshold",
    "default_policy_refusals",
    "check_enterprise_id",
    "ENTERPRISE_ID_RULE",
    "load_federation",
    "validated",
    "load_site_policy",
    "dump_toml",
    "federation_to_toml",
    "site_policy_to_toml",
]

# The pydantic field types: Literals that must list exactly ``secfed.names.MODES`` /
# ``TRAINABLE_SCOPES`` (tests/test_names.py pins both; the enums themselves live in names).
AggregationMode = Literal["secagg", "secagg+", "ckks"]
#: DP-SGD update rule at the sites; learning-rate schedule over the planned rounds.
Optimizer = Literal["sgd", "adam"]
LRSchedule = Literal["constant", "cosine"]
#: What sites train (``secfed.models.TRAINABLE_SCOPES``, largest first).
TrainableSet = Literal["adapter", "top", "head", "classifier"]
ENTERPRISE_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")  # also a DNS label: CN/SAN of its cert
#: :data:`ENTERPRISE_ID` in words, for error messages and docs
ENTERPRISE_ID_RULE = ("1 to 63 characters: lower-case letters a-z, digits, '_' or '-', "
                      "starting with a letter or digit")


def check_enterprise_id(value: str, *, field: str = "enterprise id") -> str:
    """Return ``value`` if it is a valid enterprise id (it names a folder and a certificate).

    Raises:
        ConfigError: naming ``field``, the rule in words and the value.
    """
    if not isinstance(value, str) or not ENTERPRISE_ID.match(value):
        raise ConfigError(f"{field} must be {ENTERPRISE_ID_RULE} (got {value!r})")
    return value
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def _key_hex(v: str) -> str:
    if not _HEX64.match(v):
        raise ValueError(f"must be 64 lowercase hex digits (got {len(v)} characters)")
    return v


#: A pinned Ed25519 public key as text: 64 lowercase hex digits.
_KeyHex = Annotated[str, AfterValidator(_key_hex)]


# Optimizers whose per-step update norm we can bound (secfed.training.guards.delta_norm_bound):
# plain SGD (no momentum, no weight decay) and Adam with the default betas.
OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)


def _positive_finite(name: str, value: float, *, allow_zero: bool = False) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        rule = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{name} must be a finite number {rule} (got {value!r})")


@dataclasses.dataclass(frozen=True)
class DPSGDTerms:
    """The DP-SGD mechanism of one round of local training, declared once: a round's
    :class:`RoundTerms` carries it (:attr:`RoundTerms.dp_sgd`, built by
    :meth:`DPSettings.sgd_terms`), the trainer takes it (``secfed.training.DPConfig`` is it plus
    a test-only flag) and the ledger charges it (``secfed.privacy.DPSGDEvent.of``).

    Attributes:
        noise_multiplier: sigma; the Gaussian noise std is ``noise_multiplier * max_grad_norm``.
        sample_rate: q, the Poisson sampling probability of each record per step.
        local_steps: number of DP-SGD steps this round (empty Poisson batches count).
        max_grad_norm: C, the per-example L2 clip bound.
        learning_rate: step size.
        optimizer: ``"sgd"`` (plain) or ``"adam"``.

    Raises:
        ConfigError: a value out of range; sigma = 0 (no privacy) unless
            :meth:`_zero_noise_allowed` (only ``DPConfig(allow_zero_noise=True)``, in tests).
    """

    noise_multiplier: float
    sample_rate: float
    local_steps: int
    max_grad_norm: float = 1.0
    learning_rate: float = 0.05
    optimizer: str = "sgd"

    def _zero_noise_allowed(self) -> bool:
        return False

    def __post_init__(self) -> None:
        _positive_finite("noise_multiplier", self.noise_multiplier, allow_zero=True)
        if self.noise_multiplier == 0 and not self._zero_noise_allowed():
            raise ConfigError(
                "noise_multiplier must be > 0 (got 0: no privacy); set allow_zero_noise only "
                "in tests"
            )
        _positive_finite("sample_rate", self.sample_rate)
        if self.sample_rate > 1:
            raise ConfigError(f"sample_rate must be in (0, 1] (got {self.sample_rate!r})")
        if (
            isinstance(self.local_steps, bool)
            or not isinstance(self.local_steps, int)
            or self.local_steps < 1
        ):
            raise ConfigError(f"local_steps must be an integer >= 1 (got {self.local_steps!r})")
        _positive_finite("max_grad_norm", self.max_grad_norm)
        _positive_finite("learning_rate", self.learning_rate)
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {OPTIMIZERS} (got {self.optimizer!r})")


#: The DP-SGD fields, in order (RoundTerms carries each under the same name on the wire).
DPSGD_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(DPSGDTerms))


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class RosterEntry(_Frozen):
    """One enterprise: its id (= TLS client-certificate CN) and pinned Ed25519 public key."""

    id: str
    identity_public_key: _KeyHex = Field(description="Ed25519 public key, 64 lowercase hex digits")

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        if not ENTERPRISE_ID.match(v):
            raise ValueError(f"must be {ENTERPRISE_ID_RULE} (got {v!r})")
        return v

    def public_key_bytes(self) -> bytes:
        return bytes.fromhex(self.identity_public_key)


class Deadlines(_Frozen):
    """Per-stage deadlines in seconds, measured from the moment the coordinator opens a stage."""

    train: float = Field(
        600.0, gt=0, description="advertise and upload stages: the upload covers local training"
    )
    stage: float = Field(60.0, gt=0, description="every later protocol stage")
    applied: float = Field(60.0, gt=0, description="signed new-global-hash confirmations")
    between_rounds: float = Field(0.0, ge=0, description="pause before opening the next round")
    start: float = Field(
        600.0, ge=0, description="round 1 opens once every roster site reports ready (model "
        "loaded, features computed) or this long after the coordinator starts, whichever is first"
    )


class DistributedDPSettings(_Frozen):
    """Optional enterprise-level DP (``[dp.distributed]``): each site clips its whole update to
    ``clip_norm`` and adds a Skellam noise share so that the sum over the round's guaranteed
    minimum of shares has noise std ``noise_multiplier`` x (rounded L2 bound) per coordinate
    (``secfed.privacy.distributed.DistributedDP``). Mask modes only."""

    clip_norm: float = Field(1.0, gt=0, description="C: L2 bound of one site's whole update")
    noise_multiplier: float = Field(1.0, gt=0, description="central sigma over the guaranteed shares")
    min_participants: int = Field(10, ge=1, description="refuse smaller rounds unless force")
    norm_units: int = Field(4096, ge=16, le=2**20, description="C in integer grid steps")
    force: bool = Field(False, description="run even below min_participants")


class DPSettings(_Frozen):
    """Record-level DP-SGD settings every site trains with (its own policy may be stricter),
    and the optional enterprise-level (distributed) DP table."""

    max_grad_norm: float = Field(1.0, gt=0)
    sample_rate: float = Field(0.05, gt=0, le=1)
    local_steps: int = Field(20, ge=1)
    learning_rate: float = Field(0.05, gt=0)
    optimizer: Optimizer = Field("sgd", description="the DP-SGD update rule")
    lr_schedule: LRSchedule = Field(
        "constant", description="cosine: learning_rate decays by a cosine over the planned rounds"
    )
    noise_multiplier: float | None = Field(
        None, gt=0, description="sigma; None = calibrated once for the planned horizon"
    )
    target_epsilon: float = Field(8.0, gt=0)
    delta: float = Field(1e-5, gt=0, lt=1)
    distributed: DistributedDPSettings | None = Field(
        None, description="enterprise-level DP (off when absent)"
    )

    def sgd_terms(self, round_number: int, rounds: int, *, noise_multiplier: float) -> DPSGDTerms:
        """The DP-SGD terms of round ``round_number`` of ``rounds`` at the federation's sigma
        (pinned, or calibrated for the horizon by the caller)."""
        return DPSGDTerms(
            noise_multiplier=noise_multiplier, sample_rate=self.sample_rate,
            local_steps=self.local_steps, max_grad_norm=self.max_grad_norm,
            learning_rate=self.round_learning_rate(round_number, rounds), optimizer=self.optimizer,
        )

    def round_learning_rate(self, round_number: int, rounds: int) -> float:
        """The step size of round ``round_number`` (1-based) of a ``rounds``-round horizon."""
        if self.lr_schedule == "constant":
            return self.learning_rate
        step = min(max(round_number - 1, 0), rounds - 1)
        return self.learning_rate * 0.5 * (1.0 + math.cos(math.pi * step / max(1, rounds)))


class ModelSettings(_Frozen):
    """What the coordinator needs to know about the shared adapter (never its values)."""

    vector_length: int = Field(ge=1)
    initial_global_hash: str = Field(description="adapter hash every site starts from (hex)")
    scale_bits: int = Field(24, ge=8, le=40)
    ring_bits: Literal[32, 64] = 64
    clip_bound: float = Field(8.0, gt=0, description="|delta_i| bound assumed by the encoding")
    trainable: TrainableSet = Field(
        "adapter", description="what sites train (secfed.models.TRAINABLE_SCOPES); vector_length "
        "is that set's size"
    )


class FederationConfig(_Frozen):
    """The shared federation settings (``federation.toml``)."""

    name: str = Field(min_length=1, max_length=64)
    coordinator_url: str
    # Required: a federation file written before the coordinator had an identity key does not
    # load (ConfigError naming this field). Ledger receipts and the signed transcript are
    # anchored under it, and a federation without it could not tell a rolled-back ledger
    # apart -- so there is no silent "unanchored" fallback. Upgrade path: generate the key with
    # ``secfed.federation.kits.write_coordinator_identity`` and add its hex to every copy.
    coordinator_identity_public_key: _KeyHex = Field(
        description="the coordinator's Ed25519 public key (signs ledger receipts and its "
        "transcript), 64 lowercase hex digits"
    )
    roster: tuple[RosterEntry, ...]
    rounds: int = Field(4, ge=1, le=100_000)
    mode_schedule: tuple[AggregationMode, ...] = ("secagg",)
    threshold: int
    min_participants: int
    neighbours: int = Field(0, ge=0, description="secagg+ graph degree; 0 = protocol default")
    probes: int = Field(
        0, ge=0, le=256, description="verified norm probes per mask-mode round (0 = none; 32 is "
        "the usual choice): norm check before the sum is released, and contribution shares"
    )
    probe_margin: float = Field(1.5, ge=1.0, description="exclusion above margin x the bound")
    probe_bound: float = Field(
        0.0, ge=0.0, description="L2 bound of each encoded update; 0 = model.clip_bound"
    )
    deadlines: Deadlines = Deadlines()
    dp: DPSettings = DPSettings()
    model: ModelSettings

    @field_validator("coordinator_url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.match(r"^https://[A-Za-z0-9.\-\[\]:]+:\d{1,5}/?$", v):
            raise ValueError(f"must be https://HOST:PORT (got {v!r})")
        return v.rstrip("/")

    @field_validator("mode_schedule")
    @classmethod
    def _schedule(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("must name at least one mode (got an empty list)")
        return v

    @model_validator(mode="after")
    def _counts(self) -> FederationConfig:
        n = len(self.roster)
        ids = [e.id for e in self.roster]
        if n < 2:
            raise ValueError(f"roster must list at least 2 enterprises (got {n})")
        if len(set(ids)) != n:
            raise ValueError(f"roster ids must be unique (got {ids})")
        if len({e.identity_public_key for e in self.roster}) != n:
            raise ValueError("roster identity_public_key values must be unique")
        if self.coordinator_identity_public_key in {e.identity_public_key for e in self.roster}:
            # one key in two roles would let a receipt pass for an enterprise's signature
            raise ValueError("coordinator_identity_public_key must differ from every roster key")
        if not 2 <= self.threshold <= n:
            raise ValueError(f"threshold must be in [2, {n}] (got {self.threshold})")
        if not self.threshold <= self.min_participants <= n:
            raise ValueError(
                f"min_participants must be in [threshold={self.threshold}, {n}] "
                f"(got {self.min_participants})"
            )
        if self.probes and self.model.ring_bits != 64:
            raise ValueError(
                "model.ring_bits must be 64 when probes are on: contribution shares do not fit "
                f"Z_2^32 (got {self.model.ring_bits})"
            )
        ddp = self.dp.distributed
        if ddp is not None and self.probes and self.probe_bound == 0:
            raise ValueError(
                "probe_bound must be > 0 when probes run with dp.distributed: each upload then "
                "carries its noise share, whose norm the clip bound does not cover (got 0)"
            )
        if ddp is not None:
            ckks = [m for m in self.mode_schedule if m not in MASK_MODES]
            if ckks:
                raise ValueError(
                    f"dp.distributed needs mask modes {list(MASK_MODES)} in every round: "
                    f"mode_schedule must not contain {sorted(set(ckks))} (got {list(self.mode_schedule)})"
                )
            if n < ddp.min_participants and not ddp.force:
                raise ValueError(
                    f"dp.distributed.min_participants = {ddp.min_participants} needs at least that "
                    f"many enterprises (got {n}); set dp.distributed.force = true to run anyway"
                )
        return self

    def mode_for_round(self, round_number: int) -> str:
        """Aggregation mode of round ``round_number`` (1-based); the schedule repeats."""
        if round_number < 1:
            raise ConfigError(f"round_number must be >= 1 (got {round_number})")
        return self.mode_schedule[(round_number - 1) % len(self.mode_schedule)]

    def enterprise_ids(self) -> tuple[str, ...]:
        return tuple(e.id for e in self.roster)

    def probe_settings(self, mode: str) -> dict[str, Any]:
        """The probe fields of a round spec in ``mode``: these settings in mask modes, none in
        ckks (ckks rounds carry no verified probes)."""
        if not self.probes or mode not in MASK_MODES:
            return {"probes": 0, "probe_margin": 0.0, "probe_bound": 0.0}
        return {"probes": self.probes, "probe_margin": self.probe_margin, "probe_bound": self.probe_bound}

    def coordinator_public_key(self) -> bytes:
        """The coordinator's pinned Ed25519 public key (raw 32 bytes)."""
        return bytes.fromhex(self.coordinator_identity_public_key)

    def public_key_of(self, enterprise_id: str) -> bytes:
        for e in self.roster:
            if e.id == enterprise_id:
                return e.public_key_bytes()
        raise ConfigError(f"enterprise id must be on the roster (got {enterprise_id!r})")


class RoundTerms(_Frozen):
    """The terms a round asks of a site, checked against its policy before any secret exists."""

    round_number: int = Field(ge=1)
    mode: AggregationMode
    participants: tuple[str, ...]
    threshold: int
    min_participants: int
    noise_multiplier: float = Field(gt=0)
    sample_rate: float = Field(gt=0, le=1)
    local_steps: int = Field(ge=1)
    max_grad_norm: float = Field(gt=0)
    learning_rate: float = Field(gt=0)
    optimizer: Optimizer = "sgd"
    delta: float = Field(gt=0, lt=1)
    distributed_dp: DistributedDPSettings | None = None  # the federation's [dp.distributed]

    @property
    def dp_sgd(self) -> DPSGDTerms:
        """The round's DP-SGD mechanism (the flat fields above are its wire form)."""
        return DPSGDTerms(**{name: getattr(self, name) for name in DPSGD_FIELDS})

    @classmethod
    def of(cls, dp: DPSGDTerms, **rest: Any) -> RoundTerms:
        """Terms carrying ``dp`` plus the round's other fields (``rest``)."""
        return cls(**dataclasses.asdict(dp), **rest)


class SitePolicy(_Frozen):
    """An enterprise's own floor (``site.toml``, only in its kit)."""

    enterprise_id: str
    budget_epsilon: float = Field(8.0, gt=0)
    delta: float = Field(1e-5, gt=0, lt=1)
    min_noise_multiplier: float = Field(0.5, gt=0)
    allowed_modes: tuple[AggregationMode, ...] | None = Field(
        None, description="modes this site takes part in; None = the modes its federation.toml "
        "schedules (ckks only if scheduled). A round's mode must also be its scheduled one."
    )
    min_threshold: int = Field(
        2, ge=2, description="fewest Shamir shares that rebuild a secret: the spec's threshold "
        "(over all participants for secagg, per neighbourhood of k + 1 for secagg+)"
    )
    min_participants: int = Field(2, ge=2)
    accept_distributed_dp: bool = Field(
        True, description="take part in rounds with enterprise-level (distributed) DP"
    )
    min_noise_shares: int = Field(
        2, ge=1, description="distributed DP: fewest noise shares the round must guarantee"
    )
    assumed_colluders: int = Field(
        1, ge=0, description="distributed DP: enterprises whose noise shares the adversary is "
        "assumed to know; the charge counts only the other shares. 1: every enterprise of the "
        "round receives the sum and knows its own share; raise it towards t - 1 for the "
        "colluding-enterprises promise"
    )

    def modes(self, schedule: tuple[str, ...] | None = None) -> tuple[str, ...]:
        """The modes this site takes part in: its own list, or the federation's scheduled modes
        (without a schedule: the mask modes -- never ckks by default)."""
        if self.allowed_modes is not None:
            return tuple(self.allowed_modes)
        return tuple(dict.fromkeys(schedule)) if schedule is not None else MASK_MODES

    def check_round(self, terms: RoundTerms, *, roster: tuple[str, ...],
                    schedule: tuple[str, ...] | None = None) -> None:
        """Refuse a round whose terms are weaker than this site's policy.

        ``schedule``: the federation's ``mode_schedule`` (the default allowed modes).

        Raises:
            ConfigError: naming the field, the rule and the value the round asked for.
        """
        if self.enterprise_id not in terms.participants:
            raise ConfigError(
                f"participants must include {self.enterprise_id!r} (got {list(terms.participants)})"
            )
        unknown = sorted(set(terms.participants) - set(roster))
        if unknown:
            raise ConfigError(f"participants must all be on the pinned roster (got {unknown})")
        if len(set(terms.participants)) != len(terms.participants):
            raise ConfigError(f"participants must be unique (got {list(terms.participants)})")
        allowed = self.modes(schedule)
        if terms.mode not in allowed:
            raise ConfigError(
                f"mode must be one of {list(allowed)} by site policy (got {terms.mode!r})"
            )
        # The terms' threshold is the spec's Shamir threshold (the join loop checks they are
        # equal); ckks has none (0).
        floor_t = max(self.min_threshold, 2)
        if terms.mode in MASK_MODES and not floor_t <= terms.threshold <= len(terms.participants):
            raise ConfigError(
                f"threshold must be in [{floor_t}, {len(terms.participants)}] by site policy "
                f"(got {terms.threshold})"
            )
        if terms.min_participants < self.min_participants:
            raise ConfigError(
                f"min_participants must be >= {self.min_participants} by site policy "
                f"(got {terms.min_participants})"
            )
        if len(terms.participants) < self.min_participants:
            raise ConfigError(
                f"number of participants must be >= {self.min_participants} by site policy "
                f"(got {len(terms.participants)})"
            )
        if terms.noise_multiplier < self.min_noise_multiplier:
            raise ConfigError(
                f"noise_multiplier must be >= {self.min_noise_multiplier} by site policy "
                f"(got {terms.noise_multiplier})"
            )
        if terms.delta > self.delta:
            raise ConfigError(f"delta must be <= {self.delta} by site policy (got {terms.delta})")
        if terms.distributed_dp is not None and not self.accept_distributed_dp:
            raise ConfigError(
                "distributed_dp must be off by site policy (accept_distributed_dp = false; "
                f"got noise_multiplier {terms.distributed_dp.noise_multiplier})"
            )

    def check_budget(self, *, spent_epsilon: float, round_epsilon_after: float) -> None:
        """Refuse a round that would take this site past its own budget.

        Raises:
            BudgetExceeded: naming spent, after-round and budget epsilon.
        """
        if not math.isfinite(round_epsilon_after) or round_epsilon_after > self.budget_epsilon:
            raise BudgetExceeded(
                f"epsilon after this round must be <= budget {self.budget_epsilon} "
                f"(spent {spent_epsilon:.4f}, would reach {round_epsilon_after:.4f})"
            )


# --------------------------------------------------------------------------------------------
# Reading


_M = TypeVar("_M", bound=BaseModel)


def _validation_message(source: str, err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(root)"
        got = e.get("input")
        msg = str(e["msg"]).removeprefix("Value error, ")
        # our validators already say what they got; pydantic's own messages do not
        got_s = "" if isinstance(got, dict | list) or "(got " in msg else f" (got {got!r})"
        parts.append(f"{loc}: {msg}{got_s}")
    return f"{source}: " + "; ".join(parts)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: file must exist (not found)") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: must be valid TOML ({exc})") from exc


def federation_from_mapping(data: Mapping[str, Any], *, source: str = "federation") -> FederationConfig:
    """Validate the parsed ``federation.toml`` structure."""
    body = dict(data.get("federation", {}))
    for table in ("deadlines", "dp", "model"):
        if table in data:
            body[table] = data[table]
    if "roster" in data:
        body["roster"] = data["roster"]
    unknown = set(data) - {"federation", "deadlines", "dp", "model", "roster"}
    if unknown:
        raise ConfigError(f"{source}: top-level tables must be known (got {sorted(unknown)})")
    try:
        return FederationConfig.model_validate(body)
    except ValidationError as exc:
        raise ConfigError(_validation_message(source, exc)) from None


def default_policy_refusals(dp: DPSettings) -> list[str]:
    """What a site's default policy (``site.toml`` as ``site init`` writes it without options)
    would refuse in every round of a federation with these DP settings: one sentence each,
    naming the setting, the policy's floor and the value (``federation init`` / ``invite``
    print them as warnings: a federation like that waits out its deadlines round after round).
    """
    refusals = []
    floor = float(SitePolicy.model_fields["min_noise_multiplier"].default)
    if dp.noise_multiplier is not None and dp.noise_multiplier < floor:
        refusals.append(
            f"--noise-multiplier {dp.noise_multiplier:g} is below the default site policy's "
            f"min_noise_multiplier {floor:g}: every site enrolled with the defaults refuses every "
            f"round (raise it, or lower min_noise_multiplier in each site's site.toml)"
        )
    return refusals


def default_of(model: type[BaseModel], field: str) -> Any:
    """The default of ``model.field`` (the one place a setting's default is written; CLI
    options take theirs from here)."""
    return model.model_fields[field].get_default(call_default_factory=True)


def validated(model: type[_M], /, **fields: Any) -> _M:
    """Build a settings model, turning validation failures into :class:`ConfigError`."""
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        raise ConfigError(_validation_message(model.__name__, exc)) from None


def load_federation(path: str | Path) -> FederationConfig:
    """Read and validate ``federation.toml``.

    Raises:
        ConfigError: the file is missing, not TOML, or a field breaks a rule.
    """
    p = Path(path)
    return federation_from_mapping(_read_toml(p), source=str(p))


def load_site_policy(path: str | Path) -> SitePolicy:
    """Read and validate an enterprise's ``site.toml`` (table ``[policy]``).

    Raises:
        ConfigError: the file is missing, not TOML, or a field breaks a rule.
    """
    p = Path(path)
    data = _read_toml(p)
    try:
        return SitePolicy.model_validate(data.get("policy", {}))
    except ValidationError as exc:
        raise ConfigError(_validation_message(str(p), exc)) from None


# --------------------------------------------------------------------------------------------
# Writing


def _toml_key(key: str) -> str:
    return key if re.match(r"^[A-Za-z0-9_-]+$", key) else _toml_scalar(key)


def _toml_scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ConfigError(f"TOML values must be finite numbers (got {value})")
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        if any(ord(c) < 0x20 for c in escaped):
            raise ConfigError(f"TOML strings must not hold control characters (got {value!r})")
        return f'"{escaped}"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_scalar(v) for v in value) + "]"
    raise ConfigError(f"TOML value must be str/int/float/bool/list (got {type(value).__name__})")


def dump_toml(doc: Mapping[str, Any]) -> str:
    """Write a small document: top-level scalars, tables of scalars (and sub-tables, written as
    ``[table.sub]``; a ``None`` value is left out), arrays of tables of scalars."""
    lines: list[str] = []
    tables: list[tuple[str, Mapping[str, Any]]] = []
    arrays: list[tuple[str, list[Mapping[str, Any]]]] = []
    for key, value in doc.items():
        if value is None:
            continue
        if isinstance(value, Mapping):
            tables.append((_toml_key(key), value))
        elif isinstance(value, list | tuple) and value and isinstance(value[0], Mapping):
            arrays.append((key, list(value)))
        else:
            lines.append(f"{_toml_key(key)} = {_toml_scalar(value)}")
    while tables:  # a table's sub-tables follow it as [name.sub]
        name, table = tables.pop(0)
        lines += ["", f"[{name}]"]
        subs = [(f"{name}.{_toml_key(k)}", v) for k, v in table.items() if isinstance(v, Mapping)]
        lines += [f"{_toml_key(k)} = {_toml_scalar(v)}" for k, v in table.items()
                  if v is not None and not isinstance(v, Mapping)]
        tables[0:0] = subs
    for name, items in arrays:
        for item in items:
            lines += ["", f"[[{_toml_key(name)}]]"]
            lines += [f"{_toml_key(k)} = {_toml_scalar(v)}" for k, v in item.items() if v is not None]
    return "\n".join(lines).lstrip("\n") + "\n"


def federation_to_toml(cfg: FederationConfig) -> str:
    """The ``federation.toml`` text for ``cfg`` (round-trips through :func:`load_federation`)."""
    data = cfg.model_dump(mode="json")
    federation = {
        k: data[k]
        for k in (
            "name",
            "coordinator_url",
            "coordinator_identity_public_key",
            "rounds",
            "mode_schedule",
            "threshold",
            "min_participants",
            "neighbours",
            "probes",
            "probe_margin",
            "probe_bound",
        )
    }
    doc = {
        "federation": federation,
        "deadlines": data["deadlines"],
        "dp": data["dp"],
        "model": data["model"],
        "roster": data["roster"],
    }
    return "# secfed federation settings (shared by every party)\n" + dump_toml(doc)


def site_policy_to_toml(policy: SitePolicy) -> str:
    """The ``site.toml`` text for ``policy``."""
    return (
        "# this site's own privacy floor: no round spec from the coordinator can weaken it\n"
        + dump_toml({"policy": policy.model_dump(mode="json")})
    )
