"""Round parameters, stages, the participant's safety policy, session ids and the SecAgg+ graph.

``RoundSpec`` is what the coordinator announces; ``ParticipantPolicy.check`` is what every
enterprise runs on it *before* it creates any secret. The SecAgg+ neighbour graph (Bell et al.,
CCS 2020) is a Harary graph over a permutation drawn from an AES-CTR stream keyed by
:func:`graph_seed`: a hash of the session id and of every party's 32-byte coin, committed to in
its signed advertisement and revealed only once the key roster is fixed (stage ``reveal``). No
party, colluding or not, can steer the graph: when the coins become known nothing can change any
more, and a withheld or wrong coin aborts the round (it never excludes the party, which would let
colluders choose among 2^c graphs).
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from secfed import names
from secfed.crypto.encoding import check_headroom
from secfed.crypto.prg import keystream
from secfed.errors import ConfigError, HeadroomError, MessageFormatError, ProtocolAbort
from secfed.names import MASK_MODES, MIN_THRESHOLD, MODES, Stage, default_threshold
from secfed.protocol.probes import DEFAULT_PROBE_MARGIN, MAX_PROBES
from secfed.protocol.wire import Reader, Writer

__all__ = [
    "Stage",
    "MODES",
    "MASK_MODES",
    "SPEC_VERSION",
    "RoundSpec",
    "ParticipantPolicy",
    "default_threshold",
    "default_neighbours",
    "neighbour_graph",
    "graph_seed",
    "COIN_BYTES",
    "session_id",
    "committed_session_id",
    "neighbourhood_failure_bound",
    "tolerated_colluders",
]

SPEC_VERSION = 1
_MODE_CODE = {m: i for i, m in enumerate(MODES)}
_SPEC_LABEL = names.LABEL_SPEC
_SESSION_LABEL = names.LABEL_SESSION
_COMMITTED_SESSION_LABEL = names.LABEL_SESSION_ROSTER
_GRAPH_LABEL = names.LABEL_GRAPH
_GRAPH_SEED_LABEL = names.LABEL_GRAPH_SEED
COIN_BYTES = 32  # each party's contribution to the SecAgg+ graph seed
MAX_PARTICIPANTS = 65535  # Shamir x-coordinates are 2 bytes on the wire


@functools.lru_cache(maxsize=16)
def _positions(participants: tuple[str, ...]) -> dict[str, int]:
    return {p: i for i, p in enumerate(participants)}


def tolerated_colluders(n_holders: int, t: int) -> int:
    """Most colluding enterprises a malicious coordinator may have without learning an honest
    input, or a sum over fewer than two honest inputs (``secagg``, n = all participants); a
    negative value: not even the coordinator alone is covered.

    Two ways in, both closed by the responder's rule (t others in the survivor set whose shares
    reached it, t consistency signatures from others, never both shares of an owner):

    * the colluders ``C`` hold ``t`` shares of a victim's seeds by themselves: needs |C| >= t
      (and with |C| <= t - 1 every accepted survivor set holds an honest party besides the
      victim, so the victim never counts itself into a sum of one honest input);
    * a split view: the coordinator shows honest group H1 (with the victim) a survivor set with
      the victim and H2 one without it, so H1 ∪ C release the victim's self-mask seed and H2 ∪ C
      its mask key (or a peer's). Each group needs an honest responder, and each responder ``t``
      signatures from others on its set: |Hi| - 1 + |C| >= t. H1, H2 are disjoint honest sets,
      |H1| + |H2| <= n - |C|, so the split needs 2(t + 1 - |C|) <= n - |C|: |C| >= 2t + 2 - n.

    Hence ``min(t - 1, 2t + 1 - n)``. In ``secagg+`` the same count holds inside one owner's
    neighbourhood (``n_holders = k + 1``, since a share of o leaves only with t signatures from
    o's other holders), for the attack on both seeds of that owner; a split that takes the
    victim's self-mask seed from its neighbourhood and a peer's mask key from the peer's is not
    bounded by this local count.
    """
    return min(t - 1, 2 * t + 1 - n_holders)


def default_neighbours(n: int) -> int:
    """SecAgg+ degree k: even, near 4*log2(n), at most n-1 (Bell et al. 2020, k = O(log n)).

    Each neighbourhood (k+1 parties, threshold t = floor(2(k+1)/3) others besides a responder)
    survives k-t dropouts. Against *random* failures (:func:`neighbourhood_failure_bound`, union
    bound over all n neighbourhoods): n=1000, k=40, t=27 aborts with probability 6e-6 at 5 %
    dropouts (3e-2 at 10 %); random colluders reach t in some neighbourhood with probability
    2e-7 at 20 % corruption (2e-2 at 1/3), and exceed the local split-view count
    (:func:`tolerated_colluders` of k+1, t = 14) with 6e-7 at 5 % (5e-3 at 10 %). Larger k (the
    ``neighbours`` argument) buys more; see threat_model/THREATS.md.
    """
    if n <= 2:
        return 0
    k = 2 * math.ceil(2 * math.log2(n))
    return min(k, (n - 1) - (n - 1) % 2)


def neighbourhood_failure_bound(*, n: int, k: int, t: int, fraction: float, bad_at_least: int) -> float:
    """Union bound over the n neighbourhoods that ``bad_at_least`` of k+1 members are "bad".

    Members are bad independently with probability ``fraction`` (a random dropout or a random
    corrupted enterprise). For dropouts use ``bad_at_least = k + 1 - t`` (fewer than t + 1
    members left: no responder sees t others); for corruption use ``bad_at_least = t`` (the
    colluders could reconstruct a seed by themselves) or ``tolerated_colluders(k + 1, t) + 1``
    (a split view inside one neighbourhood).
    """
    m = k + 1
    tail = sum(
        math.comb(m, j) * fraction**j * (1 - fraction) ** (m - j)
        for j in range(max(0, bad_at_least), m + 1)
    )
    return min(1.0, n * tail)


@dataclass(frozen=True, slots=True)
class RoundSpec:
    """One round's public parameters, announced by the coordinator and checked by everyone.

    ``threshold`` is the Shamir threshold: over all participants for ``secagg``, within each
    neighbourhood (a party and its ``neighbours``) for ``secagg+``; for ``ckks`` it is unused
    (0) and ``min_participants`` is the minimum set size.
    """

    federation: str
    round_number: int
    mode: str
    participants: tuple[str, ...]
    threshold: int
    vector_length: int
    scale_bits: int = 24
    ring_bits: int = 64
    clip_bound: float = 0.0
    min_participants: int = 2
    neighbours: int = 0
    global_hash: str = ""
    probes: int = 0
    probe_margin: float = 0.0
    probe_bound: float = 0.0

    @classmethod
    def create(
        cls,
        *,
        federation: str,
        round_number: int,
        mode: str,
        participants: Sequence[str],
        vector_length: int,
        threshold: int | None = None,
        neighbours: int | None = None,
        min_participants: int | None = None,
        scale_bits: int = 24,
        ring_bits: int = 64,
        clip_bound: float = 0.0,
        global_hash: str = "",
        probes: int = 0,
        probe_margin: float | None = None,
        probe_bound: float = 0.0,
    ) -> RoundSpec:
        """A spec with the privacy-first defaults filled in (t = floor(2n/3), k = O(log n)).

        ``probes`` > 0 (mask modes; :data:`secfed.protocol.probes.DEFAULT_PROBES` is the usual
        choice) turns on the verified norm check and contribution shares; ``probe_margin``
        defaults to :data:`secfed.protocol.probes.DEFAULT_PROBE_MARGIN` then, and the bound
        each update must meet is ``probe_bound``, or the clip bound when that is 0.
        """
        n = len(participants)
        k = 0
        if mode == "secagg+":
            k = default_neighbours(n) if neighbours is None else neighbours
            t = default_threshold(k + 1) if threshold is None else threshold
            mp = min(n, default_threshold(n) + 1) if min_participants is None else min_participants
        elif mode == "secagg":
            t = default_threshold(n) if threshold is None else threshold
            mp = t if min_participants is None else min_participants
        else:
            t = 0 if threshold is None else threshold
            mp = min(n, 2) if min_participants is None else min_participants
        spec = cls(
            federation=federation,
            round_number=round_number,
            mode=mode,
            participants=tuple(participants),
            threshold=t,
            vector_length=vector_length,
            scale_bits=scale_bits,
            ring_bits=ring_bits,
            clip_bound=clip_bound,
            min_participants=mp,
            neighbours=k,
            global_hash=global_hash,
            probes=probes,
            probe_margin=(DEFAULT_PROBE_MARGIN if probes else 0.0) if probe_margin is None else probe_margin,
            probe_bound=probe_bound,
        )
        spec.validate()
        return spec

    def validate(self) -> None:
        """Structural checks every party runs (not the policy; see :class:`ParticipantPolicy`).

        Raises:
            ConfigError: naming the field, the rule and the value.
        """
        n = len(self.participants)
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES} (got {self.mode!r})")
        if not 2 <= n <= MAX_PARTICIPANTS:
            raise ConfigError(f"participants must number 2..{MAX_PARTICIPANTS} (got {n})")
        if len(set(self.participants)) != n:
            raise ConfigError("participants must be distinct enterprise ids (got duplicates)")
        if self.round_number < 0:
            raise ConfigError(f"round_number must be >= 0 (got {self.round_number})")
        if self.vector_length < 1:
            raise ConfigError(f"vector_length must be >= 1 (got {self.vector_length})")
        if self.ring_bits not in (64, 32):
            raise ConfigError(f"ring_bits must be 64 or 32 (got {self.ring_bits})")
        if not 0 <= self.scale_bits <= self.ring_bits - 2:
            raise ConfigError(f"scale_bits must be in [0, {self.ring_bits - 2}] (got {self.scale_bits})")
        if not math.isfinite(self.clip_bound) or self.clip_bound < 0:
            raise ConfigError(f"clip_bound must be finite and >= 0 (got {self.clip_bound})")
        if not 1 <= self.min_participants <= n:
            raise ConfigError(f"min_participants must be in [1, {n}] (got {self.min_participants})")
        # A responder needs t holders *other than itself* (it never counts its own share or
        # signature), so t <= n - 1 (secagg) and t <= k (secagg+): anything higher never completes.
        if self.mode == "secagg":
            if n < MIN_THRESHOLD + 1:
                raise ConfigError(
                    f"participants must number at least {MIN_THRESHOLD + 1} for mode secagg "
                    f"(t >= {MIN_THRESHOLD} others besides each responder) (got {n})"
                )
            if not MIN_THRESHOLD <= self.threshold <= n - 1:
                raise ConfigError(
                    f"threshold must be in [{MIN_THRESHOLD}, {n - 1}] (t others besides each "
                    f"responder) (got {self.threshold})"
                )
            if self.neighbours != 0:
                raise ConfigError(f"neighbours must be 0 for mode secagg (got {self.neighbours})")
        elif self.mode == "secagg+":
            if not 2 <= self.neighbours <= n - 1 or self.neighbours % 2:
                raise ConfigError(
                    f"neighbours must be even and in [2, {n - 1}] for secagg+ (got {self.neighbours})"
                )
            if not MIN_THRESHOLD <= self.threshold <= self.neighbours:
                raise ConfigError(
                    f"threshold must be in [{MIN_THRESHOLD}, {self.neighbours}] "
                    f"(t neighbours besides each responder) (got {self.threshold})"
                )
        elif self.threshold != 0 or self.neighbours != 0:
            raise ConfigError("threshold and neighbours must be 0 for mode ckks")
        self._validate_probes()

    def _validate_probes(self) -> None:
        if self.probes == 0:
            if self.probe_margin != 0.0 or self.probe_bound != 0.0:
                raise ConfigError(
                    f"probe_margin and probe_bound must be 0 when probes is 0 (got "
                    f"{self.probe_margin}, {self.probe_bound})"
                )
            return
        if self.mode not in MASK_MODES:
            raise ConfigError(
                f"probes must be 0 for mode {self.mode}: ckks rounds carry no verified probes "
                f"(got {self.probes})"
            )
        if not 1 <= self.probes <= MAX_PROBES:
            raise ConfigError(f"probes must be in [0, {MAX_PROBES}] (got {self.probes})")
        if not math.isfinite(self.probe_margin) or self.probe_margin < 1.0:
            raise ConfigError(f"probe_margin must be finite and >= 1 (got {self.probe_margin})")
        if not math.isfinite(self.probe_bound) or self.probe_bound < 0:
            raise ConfigError(f"probe_bound must be finite and >= 0 (got {self.probe_bound})")
        if self.ring_bits != 64:
            # <enc(u_i), U'> carries 2 x scale_bits of fraction: 32 bits leave no room for it
            raise ConfigError(
                f"ring_bits must be 64 when probes are on: contribution shares do not fit "
                f"Z_2^32 at scale 2^{self.scale_bits} (got {self.ring_bits})"
            )
        if self.probe_bound == 0 and self.clip_bound == 0:
            raise ConfigError("probes need a bound to check: clip_bound or probe_bound must be > 0 (got 0)")

    @property
    def quorum(self) -> int:
        """Fewest parties any stage may continue with (secagg: t others + the responder)."""
        if self.mode == "secagg":
            return max(self.threshold + 1, self.min_participants)
        return self.min_participants

    def index(self, enterprise: str) -> int:
        """Position of ``enterprise`` in the ordered participant list (Shamir x = index + 1)."""
        pos = _positions(self.participants).get(enterprise)
        if pos is None:
            raise ProtocolAbort(f"sender {enterprise!r} is not a participant of this round")
        return pos

    def to_bytes(self) -> bytes:
        """Versioned canonical encoding (also what :meth:`digest` hashes)."""
        w = Writer().u8(SPEC_VERSION).blob(self.federation.encode("utf-8")).u64(self.round_number)
        w.u8(_MODE_CODE[self.mode]).texts(self.participants).u32(self.threshold)
        w.u64(self.vector_length).u8(self.scale_bits).u8(self.ring_bits).f64(self.clip_bound)
        w.u32(self.min_participants).u32(self.neighbours).blob(self.global_hash.encode("utf-8"))
        if self.probes:
            # Present exactly when probes are on, so every probe-less spec keeps its encoding.
            w.u16(self.probes).f64(self.probe_margin).f64(self.probe_bound)
        return w.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> RoundSpec:
        """Decode :meth:`to_bytes` output.

        Raises:
            MessageFormatError: malformed bytes or an invalid spec.
        """
        r = Reader(data, "RoundSpec")
        version = r.u8()
        if version != SPEC_VERSION:
            raise MessageFormatError(f"RoundSpec version must be {SPEC_VERSION} (got {version})")
        try:
            federation = r.blob().decode("utf-8")
            round_number = r.u64()
            code = r.u8()
            if code >= len(MODES):
                raise MessageFormatError(f"RoundSpec mode code must be < {len(MODES)} (got {code})")
            participants = r.texts()
            threshold = r.u32()
            vector_length = r.u64()
            scale_bits, ring_bits = r.u8(), r.u8()
            clip_bound = r.f64()
            min_participants, neighbours = r.u32(), r.u32()
            global_hash = r.blob().decode("utf-8")
            probes, margin, bound = 0, 0.0, 0.0
            if not r.at_end():
                probes, margin, bound = r.u16(), r.f64(), r.f64()
                if probes == 0:
                    raise MessageFormatError("RoundSpec probe fields must be absent when probes is 0")
            r.end()
            spec = cls(
                federation, round_number, MODES[code], participants, threshold, vector_length,
                scale_bits, ring_bits, clip_bound, min_participants, neighbours, global_hash,
                probes, margin, bound,
            )
            spec.validate()
        except (UnicodeDecodeError, ConfigError) as exc:
            raise MessageFormatError(f"RoundSpec is invalid: {exc}") from exc
        return spec

    def digest(self) -> bytes:
        """SHA-256 over the canonical encoding: binds advertisements to these exact parameters."""
        return hashlib.sha256(_SPEC_LABEL + self.to_bytes()).digest()


@dataclass(frozen=True, slots=True)
class ParticipantPolicy:
    """What an enterprise accepts. Checked before any secret of the round exists.

    ``min_threshold_fraction``: the Shamir threshold t -- the holders *other than* a responder
    that must survive and sign before it releases anything -- must be at least this fraction of
    the share holders, rounded down (and at most holders - 1, or no round completes). With 2/3,
    more than 2n/3 parties survive every accepted round, and whatever the fraction a spec is
    refused when :func:`tolerated_colluders` is negative (a coordinator alone could split the
    honest parties' views, Bonawitz et al. 2017 sec. 6). ``min_threshold``: an absolute
    floor on the same Shamir threshold (``spec.threshold``: over all participants for
    ``secagg``, per neighbourhood for ``secagg+``).

    ``min_neighbours``: the SecAgg+ degree k must be at least this; ``None`` (the default)
    means :func:`default_neighbours` of the round's n. A small k lets a coordinator that
    controls a few enterprises abort and retry rounds until the random graph makes them a
    victim's only neighbours (n = 12, k = 2: 1/55 per round; before the graph coins, grinding
    adverts took ~15 tries), so lowering it is an explicit choice.

    ``pinned``: RoundSpec field name -> the value the federation pinned (``federation.toml``:
    mode of this round's schedule slot, k, t, clip, ring, scale, ...); any difference is a
    refusal naming the field.
    """

    allowed_modes: tuple[str, ...] = MODES
    min_threshold_fraction: float = 2 / 3
    min_threshold: int = MIN_THRESHOLD
    min_participants: int = 2
    max_participants: int = MAX_PARTICIPANTS
    max_vector_length: int = 1 << 31
    min_neighbours: int | None = None
    last_round: int = -1  # the newest round this enterprise already took part in
    federation: str | None = None
    pinned: Mapping[str, object] = field(default_factory=dict)
    extra: Mapping[str, str] = field(default_factory=dict)

    def check(self, spec: RoundSpec, *, me: str, roster: Mapping[str, bytes]) -> None:
        """Refuse an unsafe or foreign round.

        Raises:
            ProtocolAbort: naming the field, the rule and the value received.
        """
        try:
            spec.validate()
        except ConfigError as exc:
            raise ProtocolAbort(f"round spec refused: {exc}", stage="advertise") from exc
        n = len(spec.participants)

        def refuse(msg: str) -> None:
            raise ProtocolAbort(f"round spec refused: {msg}", stage="advertise")

        if self.federation is not None and spec.federation != self.federation:
            refuse(f"federation must be {self.federation!r} (got {spec.federation!r})")
        for name, want in self.pinned.items():
            if name not in RoundSpec.__dataclass_fields__:
                refuse(f"pinned must name RoundSpec fields (got {name!r})")
            got = getattr(spec, name)
            if got != want:
                refuse(f"{name} must be {want!r} as the federation pinned it (got {got!r})")
        if spec.mode not in self.allowed_modes:
            refuse(f"mode must be one of {self.allowed_modes} (got {spec.mode!r})")
        if spec.round_number <= self.last_round:
            refuse(f"round_number must be > {self.last_round} (got {spec.round_number}): replay")
        if me not in spec.participants:
            refuse(f"participants must include this enterprise {me!r}")
        unknown = [p for p in spec.participants if p not in roster]
        if unknown:
            refuse(f"participants must all be pinned in the roster (unknown: {unknown[:3]})")
        if not self.min_participants <= n <= self.max_participants:
            refuse(f"participants must number {self.min_participants}..{self.max_participants} (got {n})")
        if spec.min_participants < min(n, self.min_participants):
            refuse(f"min_participants must be >= {min(n, self.min_participants)} (got {spec.min_participants})")
        if spec.vector_length > self.max_vector_length:
            refuse(f"vector_length must be <= {self.max_vector_length} (got {spec.vector_length})")
        if spec.mode in MASK_MODES:
            holders = n if spec.mode == "secagg" else spec.neighbours + 1
            # 1e-9: 2/3 * 9 must floor to 6, not 5 (binary fractions)
            floor_t = max(MIN_THRESHOLD, math.floor(self.min_threshold_fraction * holders + 1e-9))
            floor_t = min(floor_t, holders - 1)
            if spec.threshold < floor_t:
                refuse(
                    f"threshold must be >= {floor_t} of {holders} share holders "
                    f"(got {spec.threshold})"
                )
            if spec.threshold < self.min_threshold:
                refuse(
                    f"threshold must be >= {self.min_threshold} by site policy (the Shamir "
                    f"threshold of {holders} share holders; got {spec.threshold})"
                )
            if spec.mode == "secagg+":
                min_k = default_neighbours(n) if self.min_neighbours is None else self.min_neighbours
                min_k = min(min_k, n - 1)
                if spec.neighbours < min_k:
                    refuse(f"neighbours must be >= {min_k} for n = {n} (got {spec.neighbours})")
            if tolerated_colluders(holders, spec.threshold) < 0:
                refuse(
                    f"threshold must be >= {holders // 2} "
                    f"of {holders} share holders: below, a coordinator alone can show two honest "
                    f"groups different survivor sets (got {spec.threshold})"
                )
            if spec.clip_bound > 0:
                try:
                    check_headroom(
                        n_participants=n, max_abs=spec.clip_bound,
                        scale_bits=spec.scale_bits, ring_bits=spec.ring_bits,
                    )
                except HeadroomError as exc:
                    refuse(f"ring headroom: {exc}")


def session_id(spec: RoundSpec, adverts: Sequence[tuple[str, bytes, bytes, bytes]]) -> bytes:
    """SHA-256 over the spec digest, the round number and the ordered (id, public keys) list
    (``secagg`` and ``ckks``; ``secagg+`` commits to its roster by :func:`committed_session_id`).

    ``adverts`` holds ``(enterprise id, identity key, cipher key, mask key)`` in spec order.
    """
    h = hashlib.sha256(_SESSION_LABEL)
    h.update(spec.digest())
    h.update(spec.round_number.to_bytes(8, "big"))
    for enterprise, identity, cpk, spk in adverts:
        raw = enterprise.encode("utf-8")
        h.update(len(raw).to_bytes(1, "big") + raw)
        for key in (identity, cpk, spk):
            h.update(len(key).to_bytes(1, "big") + key)
    return h.digest()


def committed_session_id(spec: RoundSpec, *, members: bytes, coin_root: bytes, advert_root: bytes) -> bytes:
    """The secagg+ session id: SHA-256 over the spec digest, the round number, the roster's
    member bitmap, its coin-commitment hash and its advert Merkle root
    (:mod:`secfed.protocol.roster`). Like :func:`session_id` it fixes every advert and every
    coin commitment (hence the graph once the coins are out), but a party checks only its own
    advert and its neighbours' against it, each with an O(log n) audit path.

    Raises:
        ConfigError: a root that is not 32 bytes.
    """
    if len(coin_root) != 32 or len(advert_root) != 32:
        raise ConfigError(f"roster roots must be 32 bytes (got {len(coin_root)}, {len(advert_root)})")
    h = hashlib.sha256(_COMMITTED_SESSION_LABEL)
    h.update(spec.digest())
    h.update(spec.round_number.to_bytes(8, "big"))
    h.update(len(members).to_bytes(4, "big") + members)
    h.update(coin_root + advert_root)
    return h.digest()


def graph_seed(sid: bytes, coins: Sequence[bytes]) -> bytes:
    """The SecAgg+ graph seed: SHA-256(label || session id || every party's coin, spec order).

    Uniform as long as one coin is: an honest party's coin is fresh from ``secrets`` and hidden
    behind its commitment until the session id (every advert, every commitment) is fixed.

    Raises:
        ConfigError: a coin that is not 32 bytes.
    """
    h = hashlib.sha256(_GRAPH_SEED_LABEL + sid)
    for coin in coins:
        if len(coin) != COIN_BYTES:
            raise ConfigError(f"graph coin must be {COIN_BYTES} bytes (got {len(coin)})")
        h.update(coin)
    return h.digest()


def neighbour_graph(spec: RoundSpec, seed: bytes) -> dict[str, frozenset[str]]:
    """Each participant's neighbours (excluding itself).

    ``secagg``: everyone. ``secagg+``: a k-regular Harary graph (each node joined to the k/2
    nearest on each side of a ring) over a permutation seeded by SHA-256(label || ``seed``),
    where ``seed`` is :func:`graph_seed` of the session id and the revealed coins.
    """
    parts = spec.participants
    n = len(parts)
    if spec.mode != "secagg+":
        everyone = frozenset(parts)
        return {p: everyone - {p} for p in parts}
    seed = hashlib.sha256(_GRAPH_LABEL + seed).digest()
    draws = keystream(seed, n, np.uint64)
    order = list(range(n))
    for i in range(n - 1, 0, -1):  # Fisher-Yates; modulo bias < n/2^64, irrelevant for a public graph
        j = int(draws[i]) % (i + 1)
        order[i], order[j] = order[j], order[i]
    half = spec.neighbours // 2
    graph: dict[str, set[str]] = {p: set() for p in parts}
    for pos in range(n):
        u = parts[order[pos]]
        for step in range(1, half + 1):
            v = parts[order[(pos + step) % n]]
            graph[u].add(v)
            graph[v].add(u)
    return {p: frozenset(s) for p, s in graph.items()}
