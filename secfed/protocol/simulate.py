"""In-process simulation of whole rounds: every party, every dropout, every coordinator attack.

:func:`simulate` runs the real state machines of :mod:`secfed.protocol` (no shortcuts): fresh
identities, one :class:`ParticipantRound` per update, one :class:`CoordinatorRound`, payloads
passed as bytes. A named ``adversary`` rewrites the coordinator's outgoing payloads the way a
malicious coordinator would; every attack must end in a :class:`ProtocolAbort` raised by the
honest participants before they release a secret.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from secfed.crypto.keys import IdentityKey, X25519KeyPair
from secfed.errors import ConfigError, ProtocolAbort, SecfedError
from secfed.names import ADVERSARIES, MODES, PROBE_ONLY_STAGES, STAGES_OF, Mode
from secfed.protocol.coordinator import CoordinatorRound, ProbeOutcome
from secfed.protocol.messages import (
    AdvertiseKeys,
    ConsistencyRequest,
    ConsistencySignature,
    KeyRoster,
    NeighbourRoster,
    UnmaskRequest,
    decode_message,
)
from secfed.protocol.participant import NoiseHook, ParticipantRound
from secfed.protocol.spec import ParticipantPolicy, RoundSpec, Stage

__all__ = [
    "simulate",
    "SimulationResult",
    "ADVERSARIES",
    "DROP_STAGES",
    "SentRecord",
    "role_updates",
    "plaintext_contributions",
    "ROLES",
]

ROLES = ("honest", "free-rider", "attacker")

DROP_STAGES: tuple[str, ...] = tuple(s.value for s in STAGES_OF[Mode.SECAGG])
# probed rounds only (probes > 0): the norm-probe report and the contribution report
PROBE_STAGES: tuple[str, ...] = tuple(s.value for s in PROBE_ONLY_STAGES)
# secagg+ only: a party that withholds its graph coin aborts the round (never excluded)
REVEAL_STAGE = Stage.REVEAL.value
_FEDERATION = "simulation"

SentRecord = tuple[str, int, str, bytes]  # (stage, participant index, message type, payload)


@dataclass(frozen=True)
class SimulationResult:
    """Outcome of :func:`simulate`.

    ``aggregate`` is the decoded float sum over ``survivors`` (participant indices); ``timings``
    holds ``participant_protect`` (mean seconds one participant spends encoding and masking or
    encrypting), ``coordinator_unmask`` (seconds to recover and decode the sum) and per-stage
    totals; ``bytes_per_participant`` holds mean ``sent``, ``received`` and ``upload`` bytes.
    """

    aggregate: npt.NDArray[np.float64]
    survivors: tuple[int, ...]
    timings: Mapping[str, float]
    bytes_per_participant: Mapping[str, float]
    mode: str
    threshold: int
    neighbours: int
    participants_agree: bool = True
    extra: Mapping[str, Any] = field(default_factory=dict)
    probes: ProbeOutcome | None = None


def role_updates(
    n: int,
    d: int,
    *,
    free_riders: int = 0,
    attackers: int = 0,
    attack_scale: float = 10.0,
    bound: float = 1.0,
    seed: int = 0,
) -> tuple[list[npt.NDArray[np.float32]], list[str]]:
    """Test updates for enterprises with roles (test inputs only, from numpy's generator).

    The last ``attackers`` enterprises are attackers, the ``free_riders`` before them free
    riders, the rest honest. With g a direction all honest sites share and w_i a private unit
    vector orthogonal to it (think: DP noise): honest ``0.999 bound (0.8 g + 0.6 w_i)`` (at
    the bound); free rider ``0.999 bound 0.6 w_i`` (the noise part alone, no signal);
    attacker ``-attack_scale bound g`` (against the honest direction). A free rider's share
    is then about ||0.6 w||^2 / ||U||^2, 0.36 / (0.64 h^2 + 0.36 (h + f)) for h honest sites.

    Returns ``(updates, roles)``.

    Raises:
        ConfigError: more free riders and attackers than enterprises.
    """
    if free_riders < 0 or attackers < 0 or free_riders + attackers > n:
        raise ConfigError(
            f"free riders + attackers must be in [0, {n}] (got {free_riders} + {attackers})"
        )
    rng = np.random.default_rng(seed)
    g = rng.standard_normal(d)
    g /= np.linalg.norm(g)
    roles = ["honest"] * (n - free_riders - attackers) + ["free-rider"] * free_riders + ["attacker"] * attackers
    out = []
    for role in roles:
        w = rng.standard_normal(d)
        w -= (w @ g) * g
        w /= np.linalg.norm(w)
        if role == "attacker":
            u = -attack_scale * bound * g
        elif role == "free-rider":
            u = 0.999 * bound * 0.6 * w
        else:
            u = 0.999 * bound * (0.8 * g + 0.6 * w)
        out.append(u.astype(np.float32))
    return out, roles


def plaintext_contributions(
    updates: Sequence[npt.ArrayLike], survivors: Sequence[int]
) -> dict[int, float]:
    """``<u_i, U> / <U, U>`` in the clear over ``survivors`` (U their float64 sum), for checking."""
    vecs = {i: np.asarray(updates[i], dtype=np.float32).astype(np.float64) for i in survivors}
    total = np.sum(list(vecs.values()), axis=0)
    norm2 = float(total @ total)
    return {i: float(v @ total) / norm2 if norm2 else 0.0 for i, v in vecs.items()}


def _ids(n: int) -> list[str]:
    return [f"enterprise-{i:04d}" for i in range(n)]


def _parse_dropouts(dropouts: Mapping[str, Sequence[int]] | None, n: int) -> dict[Stage, set[int]]:
    out: dict[Stage, set[int]] = {}
    for name, idx in (dropouts or {}).items():
        if name not in (*DROP_STAGES, REVEAL_STAGE, *PROBE_STAGES):
            raise ConfigError(
                f"dropout stage must be one of {(*DROP_STAGES, REVEAL_STAGE, *PROBE_STAGES)} (got {name!r})"
            )
        bad = [i for i in idx if not 0 <= int(i) < n]
        if bad:
            raise ConfigError(f"dropout indices must be in [0, {n - 1}] (got {bad[:3]})")
        out[Stage(name)] = {int(i) for i in idx}
    return out


class _Network:
    """Delivers bytes, counts them, and records what each participant sent."""

    def __init__(self, n: int, transcript: list[SentRecord] | None) -> None:
        self.sent = [0] * n
        self.received = [0] * n
        self.upload = [0] * n
        self.transcript = transcript

    def note_sent(self, stage: Stage, i: int, payload: bytes) -> None:
        self.sent[i] += len(payload)
        if stage is Stage.UPLOAD:
            self.upload[i] = len(payload)
        if self.transcript is not None:
            self.transcript.append((stage.value, i, type(decode_message(payload)).__name__, payload))


Adversary = Callable[[Stage, dict[str, bytes], "_AttackContext"], dict[str, bytes]]


@dataclass
class _AttackContext:
    spec: RoundSpec
    ids: list[str]
    previous_round: dict[Stage, dict[str, bytes]]
    raw_consistency: dict[str, bytes] = field(default_factory=dict)


def simulate(
    updates: Sequence[npt.ArrayLike],
    *,
    mode: str = "secagg",
    threshold: int | None = None,
    dropouts: Mapping[str, Sequence[int]] | None = None,
    adversary: str | None = None,
    neighbours: int | None = None,
    min_participants: int | None = None,
    ring_bits: int = 64,
    scale_bits: int = 24,
    round_number: int = 1,
    noise_hook: NoiseHook | None = None,
    workers: int = 2,
    transcript: list[SentRecord] | None = None,
    ckks_context: Any = None,
    probes: int = 0,
    clip_bound: float = 0.0,
    probe_margin: float | None = None,
    tamper: Callable[[Stage, int, bytes], bytes] | None = None,
) -> SimulationResult:
    """Run one full round in-process over ``updates`` (participant i = ``updates[i]``).

    Args:
        updates: float vectors of one length.
        mode: ``"secagg"``, ``"secagg+"`` or ``"ckks"``.
        threshold: Shamir threshold: the holders besides each responder that must survive
            (default floor(2n/3); secagg+: of a neighbourhood); in ckks mode the minimum number
            of uploads in the sum (default 2).
        dropouts: stage name -> indices that vanish before sending that stage's message
            (stages: advertise, share, upload, consistency, unmask; secagg+ also reveal, which
            aborts the round).
        adversary: one of :data:`ADVERSARIES` (the coordinator plays that attack).
        transcript: if a list, every participant message is appended as
            ``(stage, index, type name, payload)`` -- tests inspect it for leaked secrets.
        ckks_context: a secret-key CKKS context shared by the enterprises (made if ``None``).
        probes: norm probes k (mask modes; 0 = none): the round then checks every upload's
            norm against ``clip_bound`` x ``probe_margin`` before the sum is released and
            computes contribution shares (:attr:`SimulationResult.probes`). Drop stages
            ``probe`` and ``contribute`` exist then.
        clip_bound: the per-update L2 bound the round announces (0: none).
        tamper: ``(stage, participant index, payload) -> payload`` rewrites what a participant
            sends (a lying enterprise); tests use it.

    Raises:
        ProtocolAbort: the round aborted (too many dropouts, or an attack was detected); the
            message names the stage and the counts or the refused request.
        ConfigError: bad arguments.
    """
    vecs, d = _checked_updates(updates, mode, adversary)
    n = len(vecs)
    drops = _parse_dropouts(dropouts, n)
    _check_drop_stages(drops, mode, probes)
    if mode == "ckks":
        # In ckks mode the "threshold" is the minimum number of uploads the sum must contain.
        min_participants, threshold = (threshold if threshold is not None else min_participants), None
    ids = _ids(n)
    identities = [IdentityKey.generate() for _ in range(n)]
    roster = {p: k.public_bytes() for p, k in zip(ids, identities)}
    clip = 0.0
    ctx_secret: Any = None
    ctx_public: bytes | None = None
    if mode == "ckks":
        from secfed.crypto import ckks

        ctx_secret = ckks_context if ckks_context is not None else ckks.new_context()
        ctx_public = ctx_secret.serialize(secret=False)
        clip = max(float(np.linalg.norm(v.astype(np.float64))) for v in vecs) * (1 + 1e-6) + 1e-6
    if clip_bound:
        clip = clip_bound
    spec = RoundSpec.create(
        federation=_FEDERATION, round_number=round_number, mode=mode, participants=ids,
        vector_length=d, threshold=threshold, neighbours=neighbours,
        min_participants=min_participants, scale_bits=scale_bits, ring_bits=ring_bits, clip_bound=clip,
        probes=probes, probe_margin=probe_margin,
    )
    ctx = _AttackContext(spec, ids, {})
    if adversary == "replay-previous-round":
        ctx.previous_round = _record_round(spec, ids, identities, roster, vecs, ctx_secret, ctx_public)
    # An explicit threshold or k is the caller's choice; the defaults keep the policy's floors.
    policy = ParticipantPolicy(min_threshold_fraction=0.0 if threshold is not None else 2 / 3,
                               min_neighbours=neighbours)
    run = _Run(
        parties=[
            ParticipantRound(
                spec, me=p, identity=k, roster=roster, policy=policy, ckks_context=ctx_secret,
                noise_hook=noise_hook, workers=workers, clock=time.perf_counter,
            )
            for p, k in zip(ids, identities)
        ],
        coord=CoordinatorRound(
            spec, roster=roster, ckks_public_context=ctx_public, workers=workers,
            clock=time.perf_counter, keep_records=False,
        ),
        net=_Network(n, transcript), ids=ids, drops=drops, adversary=adversary, ctx=ctx,
        tamper=tamper,
    )
    run.advertise(vecs)
    run.stages()
    return run.outcome(spec, mode)


def _checked_updates(updates: Sequence[npt.ArrayLike], mode: str,
                     adversary: str | None) -> tuple[list[npt.NDArray[np.float32]], int]:
    """The updates as float32 vectors of one length, and that length.

    Raises:
        ConfigError: an unknown mode or adversary, fewer than 2 updates, or ragged/empty ones.
    """
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {MODES} (got {mode!r})")
    if adversary is not None and adversary not in ADVERSARIES:
        raise ConfigError(f"adversary must be one of {ADVERSARIES} (got {adversary!r})")
    vecs = [np.ascontiguousarray(u, dtype=np.float32) for u in updates]
    n = len(vecs)
    if n < 2:
        raise ConfigError(f"updates must hold at least 2 vectors (got {n})")
    d = vecs[0].shape[0] if vecs[0].ndim == 1 else -1
    if d < 1 or any(v.shape != (d,) for v in vecs):
        raise ConfigError("updates must be non-empty 1-D vectors of one length")
    return vecs, d


def _check_drop_stages(drops: Mapping[Stage, set[int]], mode: str, probes: int) -> None:
    """Every dropout stage exists in this round's mode.

    Raises:
        ConfigError: reveal outside secagg+, a stage ckks does not have, or a probe stage
            without probes.
    """
    if Stage.REVEAL in drops and mode != "secagg+":
        raise ConfigError(f"dropout stage reveal exists only in mode secagg+ (got mode {mode})")
    if mode == "ckks":
        absent = sorted(s.value for s in drops if s not in STAGES_OF[Mode.CKKS])
        if absent:
            raise ConfigError(f"dropout stages {absent} do not exist in mode ckks (advertise, upload)")
    if not probes and any(s.value in PROBE_STAGES for s in drops):
        raise ConfigError("dropout stages probe and contribute exist only with probes > 0")


@dataclass
class _Run:
    """One simulated round in progress: the parties, the coordinator and the network."""

    parties: list[ParticipantRound]
    coord: CoordinatorRound
    net: _Network
    ids: list[str]
    drops: Mapping[Stage, set[int]]
    adversary: str | None
    ctx: _AttackContext
    tamper: Callable[[Stage, int, bytes], bytes] | None
    timings: dict[str, float] = field(default_factory=dict)
    alive: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.alive = set(range(len(self.parties)))
        self.index = {p: i for i, p in enumerate(self.ids)}
        self.attack = _ATTACKS.get(self.adversary) if self.adversary else None

    def advertise(self, vecs: Sequence[npt.NDArray[np.float32]]) -> None:
        """Every participant not dropped at advertise starts the round."""
        t_part = 0.0
        for i in sorted(self.alive):
            if i in self.drops.get(Stage.ADVERTISE, ()):
                self.alive.discard(i)
                continue
            self.parties[i].set_update(vecs[i])
            t0 = time.perf_counter()
            msg = self.parties[i].start()
            t_part += time.perf_counter() - t0
            self.net.note_sent(Stage.ADVERTISE, i, msg)
            self.coord.receive(self.ids[i], msg)
        self.timings["participant_advertise"] = t_part / max(1, len(self.parties))

    def stages(self) -> None:
        """Close stage after stage until the coordinator is done (or aborts).

        Raises:
            ProtocolAbort: the coordinator or a participant aborted.
        """
        coord = self.coord
        while not _finished(coord):
            closing = coord.stage
            t0 = time.perf_counter()
            try:
                outgoing = coord.close_stage()  # raises ProtocolAbort below the quorum
            except ProtocolAbort:
                if not (self.adversary == "inconsistent-survivors"
                        and closing is Stage.CONSISTENCY):
                    raise
                # The lying coordinator ignores its own (honest) bookkeeping and forges requests.
                outgoing, coord.stage = {}, Stage.UNMASK
            self.timings[f"coordinator_close_{closing.value}"] = time.perf_counter() - t0
            if "unmask" in coord.timings or "aggregate" in coord.timings:
                self.timings["coordinator_unmask"] = coord.timings.get(
                    "unmask", coord.timings.get("aggregate", 0.0))
            stage = coord.stage
            if self.attack is not None:
                outgoing = self.attack(stage, outgoing, self.ctx)
            replies = self._answer(stage, outgoing)
            if _finished(coord):
                break
            self._deliver(stage, replies)

    def _answer(self, stage: Stage, outgoing: Mapping[str, bytes]) -> dict[int, bytes]:
        """The live participants' replies to the coordinator's messages of ``stage``.

        Raises:
            ProtocolAbort: a participant aborted (naming how many and the first reason).
        """
        replies: dict[int, bytes] = {}
        times: list[float] = []
        aborts: list[ProtocolAbort] = []
        for p, payload in outgoing.items():
            i = self.index[p]
            if i not in self.alive:
                continue
            self.net.received[i] += len(payload)
            if stage in self.drops and i in self.drops[stage]:
                self.alive.discard(i)
                continue
            t0 = time.perf_counter()
            try:
                reply = self.parties[i].handle(stage, payload)
            except ProtocolAbort as exc:
                aborts.append(exc)
                self.alive.discard(i)
                continue
            times.append(time.perf_counter() - t0)
            if reply is not None:
                if self.tamper is not None:
                    reply = self.tamper(stage, i, reply)
                self.net.note_sent(stage, i, reply)
                replies[i] = reply
        if times:
            self.timings[f"participant_{stage.value}"] = float(np.mean(times))
            protect = [self.parties[i].timings["protect"] for i in replies
                       if "protect" in self.parties[i].timings]
            if stage is Stage.UPLOAD and protect:
                self.timings["participant_protect"] = float(np.mean(protect))
        if aborts:
            first = aborts[0]
            raise ProtocolAbort(
                f"{len(aborts)} participant(s) aborted at stage {stage.value}: {first}",
                stage=first.stage,
            ) from first
        return replies

    def _deliver(self, stage: Stage, replies: Mapping[int, bytes]) -> None:
        """Hand the replies to the coordinator (a lying one keeps the consistency replies)."""
        t0 = time.perf_counter()
        for i, reply in replies.items():
            if self.adversary == "inconsistent-survivors" and stage is Stage.CONSISTENCY:
                self.ctx.raw_consistency[self.ids[i]] = reply
                try:
                    self.coord.receive(self.ids[i], reply)
                except SecfedError:
                    pass  # signed a set the (lying) coordinator did not expect
                continue
            self.coord.receive(self.ids[i], reply)
        self.timings[f"coordinator_receive_{stage.value}"] = time.perf_counter() - t0

    def outcome(self, spec: RoundSpec, mode: str) -> SimulationResult:
        """The round's result, and whether every surviving party holds the same aggregate."""
        result = self.coord.result()
        survivors = tuple(self.index[p] for p in result.survivors)
        aggregate: npt.NDArray[np.float64]
        if mode == "ckks":
            outs = [self.parties[i].result().aggregate for i in sorted(self.alive)]
            aggregate = outs[0]
            agree = all(np.array_equal(o, aggregate) or np.allclose(o, aggregate, atol=1e-6)
                        for o in outs)
        else:
            assert result.aggregate is not None
            aggregate = result.aggregate
            holders = [i for i in sorted(self.alive) if self.ids[i] in result.survivors]
            agree = all(np.array_equal(self.parties[i].result().aggregate, aggregate)
                        for i in holders)
        net = self.net
        return SimulationResult(
            aggregate=aggregate,
            survivors=survivors,
            timings=self.timings,
            bytes_per_participant={
                "sent": float(np.mean(net.sent)),
                "received": float(np.mean(net.received)),
                "upload": float(np.mean([b for b in net.upload if b] or [0])),
            },
            mode=mode,
            threshold=spec.threshold,
            neighbours=spec.neighbours,
            participants_agree=agree,
            probes=result.probes,
        )


def _finished(coord: CoordinatorRound) -> bool:
    return coord.stage in (Stage.DONE, Stage.ABORTED)


def _record_round(
    spec: RoundSpec, ids: list[str], identities: list[IdentityKey], roster: Mapping[str, bytes],
    vecs: list[npt.NDArray[np.float32]], ctx_secret: Any, ctx_public: bytes | None,
) -> dict[Stage, dict[str, bytes]]:
    """Run the previous round honestly and keep the coordinator's payloads (for replay)."""
    prev = RoundSpec.create(
        federation=spec.federation, round_number=spec.round_number - 1, mode=spec.mode,
        participants=ids, vector_length=spec.vector_length, threshold=spec.threshold,
        neighbours=spec.neighbours or None, min_participants=spec.min_participants,
        scale_bits=spec.scale_bits, ring_bits=spec.ring_bits, clip_bound=spec.clip_bound,
    )
    policy = ParticipantPolicy(min_threshold_fraction=0.0, min_neighbours=prev.neighbours)
    parties = {
        p: ParticipantRound(prev, me=p, identity=k, roster=roster, policy=policy, ckks_context=ctx_secret)
        for p, k in zip(ids, identities)
    }
    coord = CoordinatorRound(prev, roster=roster, ckks_public_context=ctx_public)
    for p, v in zip(ids, vecs):
        parties[p].set_update(v)
        coord.receive(p, parties[p].start())
    seen: dict[Stage, dict[str, bytes]] = {}
    while coord.stage not in (Stage.DONE, Stage.ABORTED):
        out = coord.close_stage()
        seen[coord.stage] = out
        for p, payload in out.items():
            reply = parties[p].handle(coord.stage, payload)
            if reply is not None:
                coord.receive(p, reply)
    return seen


# -- the malicious coordinator's playbook ---------------------------------------------------------


def _substitute_key(stage: Stage, out: dict[str, bytes], ctx: _AttackContext) -> dict[str, bytes]:
    """Swap the first participant's keys for ones the coordinator holds (signature kept).

    With the victim's cipher key it could open every share sent to the victim; with its mask
    key it could strip the victim's pairwise masks. In secagg+ the victim's advert reaches only
    its neighbours (:class:`NeighbourRoster`, after the coins fixed the graph), so that is
    where it is swapped.
    """
    if not out or stage not in (Stage.REVEAL, Stage.SHARE, Stage.UPLOAD) or ctx.spec.mode == "ckks":
        return out
    victim = ctx.ids[0]
    evil_cipher = X25519KeyPair.generate().public_bytes()
    evil_mask = X25519KeyPair.generate().public_bytes()

    def swap(a: AdvertiseKeys, p: str) -> AdvertiseKeys:
        if a.sender != victim or p == victim:
            return a
        return AdvertiseKeys(a.round_number, a.spec_digest, a.sender, evil_cipher, evil_mask, a.signature,
                             a.coin_commitment)

    forged: dict[str, bytes] = {}
    for p, payload in out.items():
        msg = decode_message(payload)
        if isinstance(msg, KeyRoster):
            forged[p] = KeyRoster(msg.round_number, tuple(swap(a, p) for a in msg.adverts)).to_bytes()
        elif isinstance(msg, NeighbourRoster):
            near = tuple((swap(a, p), path) for a, path in msg.adverts)
            forged[p] = NeighbourRoster(msg.round_number, msg.session_id, msg.coins, near).to_bytes()
        else:
            return out
    return forged


def _request_both_shares(stage: Stage, out: dict[str, bytes], ctx: _AttackContext) -> dict[str, bytes]:
    """Ask every holder for the mask-key share of a survivor whose self-mask share it also asks."""
    if stage is not Stage.UNMASK:
        return out
    forged: dict[str, bytes] = {}
    for p, payload in out.items():
        msg = decode_message(payload)
        assert isinstance(msg, UnmaskRequest)
        victim = next(o for o in msg.self_mask_of if o != p)  # a survivor whose seed it asks
        forged[p] = UnmaskRequest(
            msg.round_number, msg.session_id, msg.survivors, msg.signatures,
            msg.self_mask_of, (*msg.mask_key_of, victim),
        ).to_bytes()
    return forged


def _below_threshold(stage: Stage, out: dict[str, bytes], ctx: _AttackContext) -> dict[str, bytes]:
    """Claim that only t-1 parties uploaded, hoping they unmask a small sum."""
    if stage is not Stage.CONSISTENCY:
        return out
    msg = decode_message(next(iter(out.values())))
    assert isinstance(msg, ConsistencyRequest)
    few = msg.survivors[: ctx.spec.quorum - 1]
    payload = ConsistencyRequest(msg.round_number, msg.session_id, few).to_bytes()
    return {p: payload for p in few}


def _inconsistent_survivors(stage: Stage, out: dict[str, bytes], ctx: _AttackContext) -> dict[str, bytes]:
    """Show half the survivors the full set and half a set without a victim; then unmask."""
    if stage is Stage.CONSISTENCY:
        msg = decode_message(next(iter(out.values())))
        assert isinstance(msg, ConsistencyRequest)
        full = msg.survivors
        victim = full[0]
        partial = tuple(s for s in full if s != victim)
        forged = {}
        for j, p in enumerate(full):
            surv = full if j % 2 == 0 else partial
            if p == victim:
                surv = full
            forged[p] = ConsistencyRequest(msg.round_number, msg.session_id, surv).to_bytes()
        ctx.raw_consistency.clear()
        ctx.previous_round[Stage.CONSISTENCY] = forged
        return forged
    if stage is Stage.UNMASK and ctx.raw_consistency:
        shown = ctx.previous_round[Stage.CONSISTENCY]
        sigs: dict[tuple[str, ...], list[tuple[str, bytes]]] = {}
        for p, raw in ctx.raw_consistency.items():
            req = decode_message(shown[p])
            sig = decode_message(raw)
            assert isinstance(req, ConsistencyRequest) and isinstance(sig, ConsistencySignature)
            sigs.setdefault(req.survivors, []).append((p, sig.signature))
        forged = {}
        for p in ctx.raw_consistency:
            req = decode_message(shown[p])
            assert isinstance(req, ConsistencyRequest)
            full = max(sigs, key=len)
            hidden: tuple[str, ...] = ()
            if req.survivors != full:
                hidden = tuple(s for s in full if s not in req.survivors)
            forged[p] = UnmaskRequest(
                req.round_number, req.session_id, req.survivors,
                tuple((s, sig) for s, sig in sigs[req.survivors] if s != p),
                req.survivors, hidden,
            ).to_bytes()
        return forged
    return out


def _replay_previous_round(stage: Stage, out: dict[str, bytes], ctx: _AttackContext) -> dict[str, bytes]:
    """Deliver the previous round's payloads for this stage instead of this round's."""
    old = ctx.previous_round.get(stage)
    if not old or stage is Stage.DONE:
        return out
    return {p: old.get(p, payload) for p, payload in out.items()}


_ATTACKS: dict[str, Adversary] = {
    "substitute-key": _substitute_key,
    "request-both-shares": _request_both_shares,
    "below-threshold": _below_threshold,
    "inconsistent-survivors": _inconsistent_survivors,
    "replay-previous-round": _replay_previous_round,
}
