"""The enterprise's side of a round: a state machine, messages in, messages out.

Secrets (ephemeral X25519 keys, the self-mask seed, received shares) live only in this object's
memory and are dropped as soon as the unmask response leaves. Every check runs before the
message it guards is answered; any failure aborts the round (:class:`ProtocolAbort`, naming the
stage) and the object answers nothing afterwards.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from secfed.crypto.aead import binding_ad, open_sealed, seal
from secfed.crypto.encoding import decode, encode
from secfed.crypto.keys import (
    LABEL_PAIRWISE_MASK,
    LABEL_SELF_MASK,
    LABEL_SHARE_ENCRYPTION,
    IdentityKey,
    X25519KeyPair,
    agree,
    constant_time_equal,
    derive_key,
    verify_signature,
)
from secfed.crypto.masking import DEFAULT_WORKERS, apply_masks
from secfed.crypto.shamir import Share, split_secret
from secfed.errors import ProtocolAbort, ProtocolError, SecfedError
from secfed.names import Mode
from secfed.protocol.messages import (
    SHARE_KIND_MASK_KEY,
    SHARE_KIND_SELF_MASK,
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
    Message,
    NeighbourRoster,
    ProbeReport,
    ProbeRequest,
    RosterCommitment,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
    ciphertext_digest,
    ckks_upload_signed_bytes,
    coin_commitment,
    consistency_signed_bytes,
    decode_message,
    masked_upload_signed_bytes,
    seed_commitment,
)
from secfed.protocol.probes import (
    contribution_vector,
    mask_products,
    probe_products,
    probe_seed,
    upload_digest,
)
from secfed.protocol.roster import (
    advert_leaf,
    coin_root,
    members_from_bitmap,
    verify_inclusion,
)
from secfed.protocol.spec import (
    MASK_MODES,
    ParticipantPolicy,
    RoundSpec,
    Stage,
    committed_session_id,
    graph_seed,
    neighbour_graph,
    session_id,
)

__all__ = [
    "ParticipantRound",
    "ParticipantResult",
    "NoiseHook",
    "CLIP_SLACK",
    "sum_norm_bound",
    "update_norm_bound",
    "probe_limit",
    "check_sum_norm",
    "round_to_grid",
    "open_ckks_aggregate",
    "decode_aggregate",
    "SumSpec",
    "SumShape",
    "ring_bytes",
]

# Relative slack on the clip bound: an honest site clips in float32 (the scale factor and each
# product are rounded once each: relative error <= 2 x 2^-24 per coordinate), and the float64
# norm of a d-value vector is off by at most ~d x 2^-53 relative; 2^-20 covers both for d < 2^30.
CLIP_SLACK = 2.0**-20


class NoiseHook(Protocol):
    """Adds integer noise shares in place to the encoded ring vector before masking.

    A hook may also define ``sum_l2_bound(*, spec, members) -> float``: an upper bound on the L2
    norm of the decoded sum of ``members`` honest hooked inputs, signal and noise together
    (:meth:`secfed.privacy.distributed.DistributedDP.sum_l2_bound`). The participant then checks
    the sum against it instead of against ``members x clip_bound``.
    """

    def __call__(self, encoded: npt.NDArray[np.unsignedinteger], *, spec: RoundSpec, me: str) -> None: ...


def sum_norm_bound(*, members: int, clip_bound: float, vector_length: int, scale_bits: int) -> float:
    """The largest L2 norm the decoded sum of ``members`` honest, clipped inputs can have.

    Each input has norm <= ``clip_bound`` (x (1 + :data:`CLIP_SLACK`) for float32 clipping),
    and fixed-point encoding moves each of its ``vector_length`` coordinates by at most
    2^-(scale_bits+1), i.e. its norm by at most sqrt(d) x 2^-(scale_bits+1). The ring sum of
    such encodings decodes exactly (the headroom check), so by the triangle inequality the sum
    has norm <= members x (clip_bound (1 + CLIP_SLACK) + sqrt(d) 2^-(scale_bits+1)).
    """
    rounding = math.sqrt(vector_length) * 2.0 ** -(scale_bits + 1)
    return members * (clip_bound * (1 + CLIP_SLACK) + rounding)


def update_norm_bound(spec: RoundSpec) -> float:
    """The L2 bound one enterprise's encoded update must meet in a probed round:
    ``spec.probe_bound``, or one clipped input's bound (:func:`sum_norm_bound`, one member)."""
    if spec.probe_bound > 0:
        return spec.probe_bound
    return sum_norm_bound(
        members=1, clip_bound=spec.clip_bound, vector_length=spec.vector_length,
        scale_bits=spec.scale_bits,
    )


def probe_limit(spec: RoundSpec) -> float:
    """The norm estimate above which an upload is excluded: the announced margin x the bound."""
    return spec.probe_margin * update_norm_bound(spec)


def contribution_bound(spec: RoundSpec) -> float:
    """The update norm :func:`secfed.protocol.probes.contribution_vector` sizes its grid for:
    twice the exclusion limit, so an included update whose estimate fell short of its norm by
    up to half still cannot wrap the ring."""
    return 2.0 * probe_limit(spec)


def check_sum_norm(total: npt.NDArray[np.float64], *, bound: float, what: str) -> None:
    """Refuse a sum whose L2 norm is not finite or exceeds ``bound``.

    Raises:
        ProtocolAbort: naming the norm and the bound (``what`` says where the bound comes from).
    """
    norm = float(np.linalg.norm(total))
    if not math.isfinite(norm) or norm > bound:
        raise ProtocolAbort(f"decoded sum has L2 norm {norm:.9g}, above the bound {bound:.9g} ({what})")


def round_to_grid(values: npt.NDArray[np.float64], scale_bits: int) -> npt.NDArray[np.float64]:
    """``values`` rounded to the nearest multiple of 2^-scale_bits (float64, exact)."""
    return np.rint(np.asarray(values, dtype=np.float64) * 2.0**scale_bits) * 2.0**-scale_bits


def open_ckks_aggregate(
    agg: CkksAggregate,
    *,
    ckks_context: Any,
    roster: Mapping[str, bytes],
    vector_length: int,
    scale_bits: int,
    order: Mapping[str, int] | None = None,
) -> tuple[npt.NDArray[np.float64], tuple[str, ...]]:
    """The sum of the members' signed CKKS uploads, decrypted and rounded to the round's grid.

    Nothing the coordinator computed is used: for each member the digest is recomputed from
    the ciphertext bytes and its signature (over session id, round, member, ledger head and
    that digest) is verified against the pinned key *before* any of its bytes reach the CKKS
    parser; then this enterprise adds the ciphertexts itself and decrypts only the sum (never
    an individual upload). So the result is exactly the sum of what the listed members signed
    for this session and round -- not a multiple of one upload, not a subset's sum.

    The decrypted sum is rounded to the grid 2^-scale_bits at once. Each upload was quantised
    to that grid before encryption, so the rounded sum is exactly the sum of the quantised
    updates (a deterministic function of the plaintexts) whenever the CKKS error stays below
    half a step (measured, bench/ckks_aggregate.py: <= 3.0e-9 for 10 members against half a
    step 3.0e-8 at scale_bits 24): what
    leaves the site derived from it -- the next global adapter (and its hash, signed in the
    confirmation) and so the next round's update -- carries none of the decryption noise,
    which can reveal the secret key (Li & Micciancio 2021, passive attacks on CKKS).

    Args:
        order: enterprise id -> position; when given, members must be listed in that order.

    Raises:
        ProtocolAbort: a member listed twice, out of order or not pinned; a wrong number of
            ciphertexts.
        InvalidSignature: a member's signature does not verify over the bytes shown.
        CkksError: a signed ciphertext does not parse or has other parameters.
    """
    from secfed.crypto import ckks

    want = int(ckks.n_ciphertexts(vector_length))
    seen: set[str] = set()
    last = -1
    for sender, head, cts, sig in agg.members:
        if sender in seen or sender not in roster:
            raise ProtocolAbort(f"aggregate member {sender!r} is repeated or not in the roster")
        seen.add(sender)
        if order is not None:
            pos = order.get(sender, -1)
            if pos <= last:
                raise ProtocolAbort("aggregate's member set must list each participant once, in spec order")
            last = pos
        if len(cts) != want:
            raise ProtocolAbort(f"upload of member {sender!r} must hold {want} ciphertexts (got {len(cts)})")
        verify_signature(
            roster[sender], sig,
            ckks_upload_signed_bytes(
                session_id=agg.session_id, round_number=agg.round_number, sender=sender,
                ledger_head=head, ct_digest=ciphertext_digest(cts),
            ),
        )
    if not agg.members:
        raise ProtocolAbort("aggregate lists no member")
    # Only now, every byte authenticated, is anything parsed (add_encrypted checks parameters).
    plain = ckks.decrypt_sum(ckks_context, [list(cts) for _, _, cts, _ in agg.members], vector_length)
    return round_to_grid(plain, scale_bits), tuple(m[0] for m in agg.members)


@dataclass(frozen=True, slots=True)
class ParticipantResult:
    """The decoded float sum (float64) over ``survivors`` (enterprise ids, spec order)."""

    aggregate: npt.NDArray[np.float64]
    survivors: tuple[str, ...]


class SumSpec(Protocol):
    """What decoding a round's sum needs; a :class:`RoundSpec` has all of it."""

    @property
    def round_number(self) -> int: ...
    @property
    def mode(self) -> str: ...
    @property
    def vector_length(self) -> int: ...
    @property
    def scale_bits(self) -> int: ...
    @property
    def ring_bits(self) -> int | None: ...


@dataclass(frozen=True, slots=True)
class SumShape:
    """A :class:`SumSpec` without a spec (a site catching up a round it missed);
    ``ring_bits`` None: the aggregate's own."""

    round_number: int
    mode: str
    vector_length: int
    scale_bits: int
    ring_bits: int | None = None


def decode_aggregate(
    spec: SumSpec,
    payload: bytes | MaskedAggregate | CkksAggregate,
    *,
    ckks_context: Any = None,
    roster: Mapping[str, bytes] | None = None,
    order: Mapping[str, int] | None = None,
) -> ParticipantResult:
    """The float sum a round's final message carries, and whom it is over. Pure: no session,
    survivor-set or membership check (:class:`ParticipantRound` adds those from its state; a
    site catching up a missed round compares the result's hash with what the survivors signed)
    and no norm check (each caller knows its bound).

    Masked modes: ``spec.vector_length`` words of Z_2^``spec.ring_bits`` (of the message's ring
    when ``spec.ring_bits`` is None), decoded at
    ``spec.scale_bits``. ``ckks``: :func:`open_ckks_aggregate` over the members' signed uploads
    (``order``: enterprise id -> position the members must follow).

    Raises:
        MessageFormatError: ``payload`` does not parse.
        ProtocolAbort: a message of another round or another mode, a wrong length, a ckks sum
            without a secret-key context; see also :func:`open_ckks_aggregate`.
        InvalidSignature, CkksError: see :func:`open_ckks_aggregate`.
    """
    message = decode_message(payload) if isinstance(payload, bytes | bytearray) else payload
    if message.round_number != spec.round_number:
        raise ProtocolAbort(
            f"aggregate must be for round {spec.round_number} (got {message.round_number})"
        )
    if isinstance(message, MaskedAggregate) and spec.mode in MASK_MODES:
        bits = message.ring_bits if spec.ring_bits is None else spec.ring_bits
        width = bits // 8
        if message.ring_bits != bits or len(message.vector) != spec.vector_length * width:
            raise ProtocolAbort(f"aggregate must hold {spec.vector_length} words of Z_2^{bits}")
        dtype = np.dtype(f"<u{width}")
        ring = np.frombuffer(message.vector, dtype=dtype).astype(dtype.newbyteorder("="))
        return ParticipantResult(decode(ring, scale_bits=spec.scale_bits), message.survivors)
    if isinstance(message, CkksAggregate) and spec.mode == Mode.CKKS:
        if ckks_context is None:
            raise ProtocolAbort(
                f"aggregate of round {spec.round_number} is ckks; no secret-key CKKS context"
            )
        total, members = open_ckks_aggregate(
            message, ckks_context=ckks_context, roster=roster or {},
            vector_length=spec.vector_length, scale_bits=spec.scale_bits, order=order,
        )
        return ParticipantResult(total, members)
    raise ProtocolAbort(f"aggregate of round {spec.round_number} must match its mode {spec.mode}")


def ring_bytes(vec: npt.NDArray[np.unsignedinteger]) -> bytes:
    """Little-endian words of a ring vector (the wire byte order)."""
    return vec.astype(vec.dtype.newbyteorder("<"), copy=False).tobytes()


def _shares_plaintext(b_share: Share, s_share: Share) -> bytes:
    return bytes(b_share.to_bytes()) + bytes(s_share.to_bytes())


class ParticipantRound:
    """One enterprise in one round.

    Args:
        spec: the announced round.
        me: this enterprise's id (must be in ``spec.participants`` and ``roster``).
        identity: its pinned Ed25519 identity key.
        roster: enterprise id -> pinned Ed25519 public key (raw 32 bytes).
        policy: what this enterprise accepts (checked in :meth:`start`, before any secret).
        ckks_context: a secret-key ``secfed.crypto.ckks`` context (ckks mode only).
        noise_hook: optional distributed-DP hook on the encoded vector (mask modes).
        workers: threads used to generate masks.
        clock: optional ``() -> seconds``; when given, :attr:`timings` records ``protect``
            (encode + noise + mask, or encrypt + sign). The state machine never reads time itself.
    """

    def __init__(
        self,
        spec: RoundSpec,
        *,
        me: str,
        identity: IdentityKey,
        roster: Mapping[str, bytes],
        policy: ParticipantPolicy | None = None,
        ckks_context: Any = None,
        noise_hook: NoiseHook | Callable[..., None] | None = None,
        workers: int = DEFAULT_WORKERS,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.spec = spec
        self.me = me
        self._clock = clock
        self.timings: dict[str, float] = {}
        self._identity = identity
        self._roster = dict(roster)
        self._policy = policy or ParticipantPolicy()
        self._ckks = ckks_context
        self._noise_hook = noise_hook
        self._workers = workers
        self.stage: Stage | None = None  # None until start(); then the stage it answers next
        self._update: npt.NDArray[np.float32] | None = None
        self._ledger_head = b""
        # Ephemeral secrets: memory only, dropped after the unmask response.
        self._cipher_keys: X25519KeyPair | None = None
        self._mask_keys: X25519KeyPair | None = None
        self._self_seed: bytes | None = None
        self._held: dict[str, tuple[Share, Share]] = {}
        # Probed rounds: the AES keys of this upload's masks, kept until the probe report
        # (self mask) and the contribution report (pairwise masks) have left.
        self._self_mask_key: bytes | None = None
        self._pair_seeds: dict[str, bytes] = {}
        self._upload_digest = b""
        self._probed: frozenset[str] = frozenset()  # uploads the probe request listed
        self._coin: bytes | None = None  # secagg+ graph coin: hidden until the roster is fixed
        # Public round state.
        self._advert: AdvertiseKeys | None = None
        self._adverts: dict[str, AdvertiseKeys] = {}  # secagg+: own + neighbours' only
        self._members: dict[str, int] = {}  # key-roster members (spec order) -> roster index
        self._roots = (b"", b"")  # secagg+: the committed coin and advert roots
        self._sid = b""
        self._graph: dict[str, frozenset[str]] = {}
        self._holders: frozenset[str] = frozenset()  # me + advertised neighbours
        self._peers: frozenset[str] = frozenset()  # neighbours whose shares reached me
        self._signed_survivors: tuple[str, ...] | None = None
        self._result: ParticipantResult | None = None

    # -- public API ---------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        """Whether the round finished for this enterprise (:meth:`result` is available)."""
        return self._result is not None

    @property
    def session_id(self) -> bytes:
        """The session id (empty before the key roster arrives)."""
        return self._sid

    @property
    def neighbourhood(self) -> frozenset[str] | None:
        """secagg+: this enterprise and its advertised neighbours (its share holders), once the
        coins fixed the graph -- the parties whose signed confirmations of the result it checks
        (k + 1 of them, not n). ``None`` in ``secagg`` and ``ckks`` (every party is every
        party's neighbour there: everyone is checked) and before the graph is fixed."""
        if self.spec.mode != "secagg+" or not self._holders:
            return None
        return self._holders

    def start(self) -> bytes:
        """Check the spec against policy, then create this round's keys and advertise them.

        Raises:
            ProtocolAbort: the spec is unsafe or this identity is not the pinned one.
        """
        if self.stage is not None:
            raise ProtocolError(f"start() may be called once (stage is {self.stage.value})")
        self._policy.check(self.spec, me=self.me, roster=self._roster)
        if self._roster[self.me] != self._identity.public_bytes():
            raise ProtocolAbort(
                f"identity key of {self.me!r} does not match the roster's pinned key", stage="advertise"
            )
        if self.spec.mode == "ckks" and self._ckks is None:
            raise ProtocolAbort("mode ckks needs a secret-key CKKS context", stage="advertise")
        cpk = spk = commitment = b""
        digest = self.spec.digest()
        if self.spec.mode in MASK_MODES:
            self._cipher_keys = X25519KeyPair.generate()
            self._mask_keys = X25519KeyPair.generate()
            cpk, spk = self._cipher_keys.public_bytes(), self._mask_keys.public_bytes()
        if self.spec.mode == "secagg+":
            # The graph coin is committed to now and revealed only after the key roster is
            # fixed, so no advert chosen later can depend on it (no graph grinding).
            self._coin = secrets.token_bytes(32)
            commitment = coin_commitment(spec_digest=digest, sender=self.me, coin=self._coin)
        unsigned = AdvertiseKeys(
            self.spec.round_number, digest, self.me, cpk, spk, bytes(64), commitment
        )
        sig = self._identity.sign(unsigned.signed_bytes())
        self._advert = AdvertiseKeys(self.spec.round_number, digest, self.me, cpk, spk, sig, commitment)
        if self.spec.mode == "secagg+":
            self.stage = Stage.REVEAL
        else:
            self.stage = Stage.SHARE if self.spec.mode in MASK_MODES else Stage.UPLOAD
        return self._advert.to_bytes()

    def set_update(self, update: npt.ArrayLike, *, ledger_head: bytes = b"") -> None:
        """The float update to aggregate and the opaque ledger-head bytes the upload carries.

        Raises:
            ProtocolError: wrong length or non-finite values.
        """
        vec = np.ascontiguousarray(update, dtype=np.float32)
        if vec.ndim != 1 or vec.shape[0] != self.spec.vector_length:
            raise ProtocolError(
                f"update must be a 1-D vector of length {self.spec.vector_length} (got shape {vec.shape})"
            )
        if not np.all(np.isfinite(vec)):
            raise ProtocolError("update must be finite (got NaN or infinity)")
        self._update = vec
        self._ledger_head = bytes(ledger_head)

    def handle(self, stage: Stage | str, payload: bytes) -> bytes | None:
        """Answer the coordinator's message for ``stage``; ``None`` when nothing is sent back.

        Raises:
            ProtocolAbort: any check failed; the round is over for this enterprise.
            ProtocolError: called out of order (e.g. before :meth:`set_update`); state unchanged.
        """
        stage = Stage(stage)
        if self.stage is None or self.stage in (Stage.ABORTED,) or self._result is not None:
            raise ProtocolError(
                f"participant {self.me!r} cannot handle {stage.value}: "
                f"stage is {self.stage.value if self.stage else 'not started'}"
            )
        final = Stage.CONTRIBUTE if self.spec.probes else Stage.DONE
        if stage is final and self.stage is Stage.UNMASK:
            # The coordinator unmasked without this party (its signature came late or enough
            # others answered); it may still take the result. Its shares are never needed now.
            self._forget_secrets()
            self.stage = final
        if stage is not self.stage:
            want = self.stage.value
            self._abort_now()
            raise ProtocolAbort(f"stage must be {want} (got {stage.value}) for {self.me!r}", stage=stage.value)
        if stage is Stage.UPLOAD and self._update is None:
            raise ProtocolError("set_update() must be called before the upload stage")
        try:
            message = decode_message(payload)
            if message.round_number != self.spec.round_number:
                raise ProtocolAbort(
                    f"round_number must be {self.spec.round_number} (got {message.round_number}): "
                    "a message from another round is refused"
                )
            return self._dispatch(stage, message)
        except ProtocolAbort as exc:
            self._abort_now()
            raise ProtocolAbort(f"{self.me}: {stage.value}: {exc}", stage=stage.value) from exc
        except SecfedError as exc:
            self._abort_now()
            raise ProtocolAbort(
                f"{self.me}: {stage.value}: {type(exc).__name__}: {exc}", stage=stage.value
            ) from exc

    def result(self) -> ParticipantResult:
        """The decoded sum and the survivors, once the round is done."""
        if self._result is None:
            raise ProtocolError(f"round is not done for {self.me!r}")
        return self._result

    # -- internals ----------------------------------------------------------------------------
    def _abort_now(self) -> None:
        self.stage = Stage.ABORTED
        self._forget_secrets()
        self._self_mask_key = None
        self._pair_seeds = {}

    def _forget_secrets(self) -> None:
        self._cipher_keys = None
        self._mask_keys = None
        self._self_seed = None
        self._coin = None
        self._held = {}

    def _dispatch(self, stage: Stage, message: Message) -> bytes | None:
        plus = self.spec.mode == "secagg+"
        expected: dict[Stage, type] = {
            Stage.REVEAL: RosterCommitment if plus else KeyRoster,
            Stage.SHARE: NeighbourRoster if plus else KeyRoster,
            Stage.UPLOAD: KeyRoster if self.spec.mode == "ckks" else ForwardedShares,
            Stage.PROBE: ProbeRequest,
            Stage.CONSISTENCY: ConsistencyRequest,
            Stage.UNMASK: UnmaskRequest,
            Stage.CONTRIBUTE: MaskedAggregate,
            Stage.DONE: CkksAggregate if self.spec.mode == "ckks" else MaskedAggregate,
        }
        want = expected[stage]
        if not isinstance(message, want):
            raise ProtocolAbort(f"message must be {want.__name__} (got {type(message).__name__})")
        if isinstance(message, KeyRoster):
            self._on_roster(message)
            if self.spec.mode == "ckks":
                return self._ckks_upload()
            return self._share_keys()
        if isinstance(message, RosterCommitment):
            self._on_commitment(message)
            assert self._coin is not None
            self.stage = Stage.SHARE
            return CoinReveal(self.spec.round_number, self._sid, self.me, self._coin).to_bytes()
        if isinstance(message, NeighbourRoster):
            self._on_neighbours(message)
            return self._share_keys()
        if isinstance(message, ForwardedShares):
            return self._masked_upload(message)
        if isinstance(message, ProbeRequest):
            return self._probe_report(message)
        if isinstance(message, ConsistencyRequest):
            return self._consistency(message)
        if isinstance(message, UnmaskRequest):
            return self._unmask(message)
        if isinstance(message, MaskedAggregate):
            self._masked_result(message)
            if stage is Stage.CONTRIBUTE:
                return self._contribution_report(message)
            return None
        assert isinstance(message, CkksAggregate)
        self._ckks_result(message)
        return None

    def _check_sid(self, sid: bytes) -> None:
        if sid != self._sid:
            raise ProtocolAbort("session_id does not match this round's session")

    def _on_roster(self, roster: KeyRoster) -> None:
        spec, digest = self.spec, self.spec.digest()
        last = -1
        adverts: dict[str, AdvertiseKeys] = {}
        key_len = 32 if spec.mode in MASK_MODES else 0
        commit_len = 0  # secagg+ takes a RosterCommitment, never a full KeyRoster
        for a in roster.adverts:
            if a.spec_digest != digest:
                raise ProtocolAbort(f"advertisement of {a.sender!r} is for another round spec")
            pos = spec.index(a.sender)
            if pos <= last:
                raise ProtocolAbort("key roster must list each participant once, in spec order")
            last = pos
            if len(a.cipher_key) != key_len or len(a.mask_key) != key_len:
                raise ProtocolAbort(f"advertisement of {a.sender!r} must carry {key_len}-byte keys")
            if len(a.coin_commitment) != commit_len:
                raise ProtocolAbort(
                    f"advertisement of {a.sender!r} must carry a {commit_len}-byte coin commitment "
                    f"in mode {spec.mode} (got {len(a.coin_commitment)})"
                )
            adverts[a.sender] = a
        mine = adverts.get(self.me)
        if mine is None or mine != self._advert:
            raise ProtocolAbort("key roster must carry this enterprise's own advertisement unchanged")
        if key_len:
            mask_keys = [a.mask_key for a in adverts.values()]
            if len(set(mask_keys)) != len(mask_keys) or len({a.cipher_key for a in adverts.values()}) != len(adverts):
                raise ProtocolAbort("key roster repeats an ephemeral public key")
        if len(adverts) < spec.quorum:
            raise ProtocolAbort(f"key roster names {len(adverts)} participants, below the quorum {spec.quorum}")
        self._adverts = adverts
        self._members = {p: i for i, p in enumerate(adverts)}
        self._sid = session_id(
            spec, [(p, self._roster[p], a.cipher_key, a.mask_key) for p, a in adverts.items()],
        )
        if spec.mode == "secagg":
            self._set_graph(neighbour_graph(spec, self._sid))
        # Every advertisement is checked: in secagg every party is every party's neighbour.
        for p, a in adverts.items():
            if p != self.me:
                verify_signature(self._roster[p], a.signature, a.signed_bytes())

    def _set_graph(self, graph: dict[str, frozenset[str]]) -> None:
        self._graph = graph
        self._holders = frozenset((graph[self.me] & self._members.keys()) | {self.me})
        if len(self._holders) - 1 < self.spec.threshold:
            raise ProtocolAbort(
                f"{len(self._holders) - 1} share holders besides this enterprise advertised, below "
                f"the threshold {self.spec.threshold}"
            )

    def _on_commitment(self, msg: RosterCommitment) -> None:
        """secagg+: take the committed roster (members, coin root, advert root) and check this
        party's own advert is in it, unchanged, before the coin leaves. The session id binds
        all of it; the neighbours' adverts are checked against it once the graph is fixed."""
        spec = self.spec
        members = members_from_bitmap(spec.participants, msg.members)
        self._members = {p: i for i, p in enumerate(members)}
        index = self._members.get(self.me)
        assert self._advert is not None
        mine = self._advert
        leaf = advert_leaf(sender=self.me, identity_key=self._roster[self.me], cipher_key=mine.cipher_key,
                           mask_key=mine.mask_key, coin_commitment=mine.coin_commitment, signature=mine.signature)
        if index is None or not verify_inclusion(leaf, index, len(members), msg.path, msg.advert_root):
            raise ProtocolAbort("key roster must carry this enterprise's own advertisement unchanged")
        if len(members) < spec.quorum:
            raise ProtocolAbort(f"key roster names {len(members)} participants, below the quorum {spec.quorum}")
        self._roots = (msg.coin_root, msg.advert_root)
        self._adverts = {self.me: mine}
        self._sid = committed_session_id(spec, members=msg.members, coin_root=msg.coin_root,
                                         advert_root=msg.advert_root)

    def _on_neighbours(self, msg: NeighbourRoster) -> None:
        """secagg+: check every revealed coin against the committed commitments, fix the graph,
        then check each neighbour's advert (signature and audit path) before using its keys.
        A missing or wrong coin aborts: excluding the party instead would let colluders pick
        the graph among 2^c outcomes by withholding reveals."""
        spec = self.spec
        self._check_sid(msg.session_id)
        members = list(self._members)
        if len(msg.coins) != len(members):
            raise ProtocolAbort(
                f"coin roster must carry the coin of every key-roster member, in spec order "
                f"({len(msg.coins)} coins for {len(members)} members): a withheld reveal aborts the round"
            )
        digest = spec.digest()
        commitments = [coin_commitment(spec_digest=digest, sender=p, coin=c) for p, c in zip(members, msg.coins)]
        if not constant_time_equal(coin_root(commitments), self._roots[0]):
            raise ProtocolAbort("a coin does not match the commitment in its signed advert (coin root differs)")
        assert self._coin is not None
        if not constant_time_equal(msg.coins[self._members[self.me]], self._coin):
            raise ProtocolAbort("coin roster must carry this enterprise's own coin unchanged")
        self._set_graph(neighbour_graph(spec, graph_seed(self._sid, msg.coins)))
        want = [p for p in members if p in self._holders and p != self.me]
        if [a.sender for a, _ in msg.adverts] != want:
            raise ProtocolAbort(f"neighbour roster must carry exactly the adverts of this enterprise's "
                                f"{len(want)} advertised neighbours, in spec order")
        for a, path in msg.adverts:
            self._check_neighbour(a, path, commitments[self._members[a.sender]], digest)
            self._adverts[a.sender] = a
        mask_keys = [a.mask_key for a in self._adverts.values()]
        cipher_keys = {a.cipher_key for a in self._adverts.values()}
        if len(set(mask_keys)) != len(mask_keys) or len(cipher_keys) != len(mask_keys):
            raise ProtocolAbort("key roster repeats an ephemeral public key")

    def _check_neighbour(self, a: AdvertiseKeys, path: tuple[bytes, ...], commitment: bytes, digest: bytes) -> None:
        p = a.sender
        if a.spec_digest != digest:
            raise ProtocolAbort(f"advertisement of {p!r} is for another round spec")
        if len(a.cipher_key) != 32 or len(a.mask_key) != 32:
            raise ProtocolAbort(f"advertisement of {p!r} must carry 32-byte keys")
        if a.coin_commitment != commitment:
            raise ProtocolAbort(f"advertisement of {p!r} carries another coin commitment than the committed one")
        # This party uses these keys: it verifies the signature itself, then that the advert
        # is the one every other member's session id commits to.
        verify_signature(self._roster[p], a.signature, a.signed_bytes())
        leaf = advert_leaf(sender=p, identity_key=self._roster[p], cipher_key=a.cipher_key, mask_key=a.mask_key,
                           coin_commitment=a.coin_commitment, signature=a.signature)
        if not verify_inclusion(leaf, self._members[p], len(self._members), path, self._roots[1]):
            raise ProtocolAbort(f"advertisement of {p!r} is not the one under the committed roster")

    def _share_key(self, peer: str) -> bytes:
        assert self._cipher_keys is not None
        shared = agree(self._cipher_keys, self._adverts[peer].cipher_key)
        return bytes(derive_key(shared, session_id=self._sid, purpose=LABEL_SHARE_ENCRYPTION))

    def _share_keys(self) -> bytes:
        assert self._mask_keys is not None
        spec = self.spec
        n = len(spec.participants)
        self._self_seed = secrets.token_bytes(32)
        b_shares = split_secret(self._self_seed, threshold=spec.threshold, n_shares=n)
        s_shares = split_secret(self._mask_keys.private_bytes(), threshold=spec.threshold, n_shares=n)
        sealed = []
        for peer in spec.participants:
            if peer not in self._holders:
                continue
            i = spec.index(peer)
            if peer == self.me:
                self._held[self.me] = (b_shares[i], s_shares[i])
                continue
            ad = binding_ad(session_id=self._sid, round_number=spec.round_number, sender=self.me, receiver=peer)
            sealed.append((peer, seal(self._share_key(peer), _shares_plaintext(b_shares[i], s_shares[i]), associated_data=ad)))
        self.stage = Stage.UPLOAD
        commitment = seed_commitment(session_id=self._sid, owner=self.me, seed=self._self_seed)
        return ShareKeys(spec.round_number, self._sid, self.me, commitment, tuple(sealed)).to_bytes()

    def _masked_upload(self, fwd: ForwardedShares) -> bytes:
        spec = self.spec
        self._check_sid(fwd.session_id)
        if fwd.receiver != self.me:
            raise ProtocolAbort(f"forwarded shares are addressed to {fwd.receiver!r}, not {self.me!r}")
        my_x = spec.index(self.me) + 1
        seen: set[str] = set()
        for sender, blob in fwd.sealed:
            if sender in seen or sender == self.me or sender not in self._holders:
                raise ProtocolAbort(f"forwarded share from {sender!r} is not from a distinct neighbour")
            seen.add(sender)
            ad = binding_ad(session_id=self._sid, round_number=spec.round_number, sender=sender, receiver=self.me)
            plain = open_sealed(self._share_key(sender), blob, associated_data=ad)
            if len(plain) != 70:
                raise ProtocolAbort(f"share pair from {sender!r} must be 70 bytes (got {len(plain)})")
            b_share, s_share = Share.from_bytes(plain[:35]), Share.from_bytes(plain[35:])
            if b_share.x != my_x or s_share.x != my_x:
                raise ProtocolAbort(f"share from {sender!r} is not at this enterprise's index")
            self._held[sender] = (b_share, s_share)
        self._peers = frozenset(seen)
        if len(seen) < spec.threshold:
            # Never count itself: with its own share, t-1 colluders would reach t alone.
            raise ProtocolAbort(
                f"{len(seen)} share holders besides this enterprise remain, below the threshold "
                f"{spec.threshold}"
            )
        assert self._update is not None and self._self_seed is not None and self._mask_keys is not None
        started = self._clock() if self._clock else 0.0
        encoded = encode(
            self._update, scale_bits=spec.scale_bits, ring_bits=spec.ring_bits,
            n_participants=len(spec.participants),
        )
        if self._noise_hook is not None:
            self._noise_hook(encoded, spec=spec, me=self.me)
        my_pos = spec.index(self.me)
        masks = [(derive_key(self._self_seed, session_id=self._sid, purpose=LABEL_SELF_MASK), 1)]
        for peer in sorted(self._peers, key=spec.index):
            shared = agree(self._mask_keys, self._adverts[peer].mask_key)
            seed = derive_key(shared, session_id=self._sid, purpose=LABEL_PAIRWISE_MASK)
            masks.append((seed, 1 if my_pos < spec.index(peer) else -1))
            if spec.probes:
                self._pair_seeds[peer] = bytes(seed)
        if spec.probes:
            self._self_mask_key = bytes(masks[0][0])
        apply_masks(encoded, masks, workers=self._workers)
        if self._clock:
            self.timings["protect"] = self._clock() - started
        self._update = None  # the plaintext update is not needed any more
        self.stage = Stage.PROBE if spec.probes else Stage.CONSISTENCY
        vector = ring_bytes(encoded)
        self._upload_digest = upload_digest(vector)
        # The ledger head travels signed with the vector (as in ckks mode): the coordinator can
        # hold this site to it, and nobody can move it onto another upload.
        sig = self._identity.sign(masked_upload_signed_bytes(
            session_id=self._sid, round_number=spec.round_number, sender=self.me,
            ledger_head=self._ledger_head, vector=vector, vector_digest=self._upload_digest,
        ))
        return MaskedUpload(
            spec.round_number, self._sid, self.me, self._ledger_head, spec.ring_bits, vector, sig
        ).to_bytes()

    def _probe_report(self, req: ProbeRequest) -> bytes:
        """Report this upload's mask terms for the probes fixed by every listed upload.

        The enterprise derives the probes itself from the listed upload digests, which must
        include its own upload unchanged: the probes cannot have been chosen before its upload
        (or any other listed one) existed. The count must be the one the round terms announce.
        """
        spec = self.spec
        self._check_sid(req.session_id)
        if req.probes != spec.probes:
            raise ProtocolAbort(
                f"probe request asks for {req.probes} probes; the round terms announce "
                f"{spec.probes}: each probe reveals one more scalar of every update"
            )
        self._check_listed((sender for sender, _ in req.uploads), "probe request", "upload")
        digests = dict(req.uploads)
        if digests.get(self.me) != self._upload_digest:
            raise ProtocolAbort(
                "probe request must list this enterprise's own upload digest unchanged: probes "
                "are derived from the uploads and cannot exist before them"
            )
        if len(req.uploads) < spec.quorum:
            raise ProtocolAbort(
                f"probe request lists {len(req.uploads)} uploads, below the quorum {spec.quorum}"
            )
        assert self._self_mask_key is not None
        peers = [p for p in spec.participants if p in self._pair_seeds]
        seed = probe_seed(self._sid, req.uploads)
        products = probe_products(
            [self._self_mask_key, *(self._pair_seeds[p] for p in peers)],
            seed=seed, k=spec.probes, ring_bits=spec.ring_bits, length=spec.vector_length,
            workers=self._workers,
        )
        self._self_mask_key = None
        self._probed = frozenset(digests)
        self.stage = Stage.CONSISTENCY
        return ProbeReport(
            spec.round_number, self._sid, self.me, products[0], tuple(zip(peers, products[1:]))
        ).to_bytes()

    def _contribution_report(self, agg: MaskedAggregate) -> bytes:
        """``<PRG(pair seed), U'>`` for every surviving peer (the only mask terms of
        ``<y_i, U'>`` the coordinator cannot compute itself once it unmasked)."""
        spec = self.spec
        dtype = np.dtype(f"<u{spec.ring_bits // 8}")
        ring_sum = np.frombuffer(agg.vector, dtype=dtype).astype(dtype.newbyteorder("="), copy=False)
        coarse, _ = contribution_vector(
            ring_sum, ring_bits=spec.ring_bits, scale_bits=spec.scale_bits,
            update_bound=contribution_bound(spec),
        )
        peers = [p for p in agg.survivors if p in self._pair_seeds]
        terms = mask_products([self._pair_seeds[p] for p in peers], coarse, ring_bits=spec.ring_bits)
        self._pair_seeds = {}
        self.stage = Stage.DONE
        return ContributionReport(spec.round_number, self._sid, self.me, tuple(zip(peers, terms))).to_bytes()

    def _check_listed(self, names: Iterable[str], what: str, item: str) -> None:
        """``names``, a list the coordinator sent (``what``, of ``item``s), holds each party at
        most once, in spec order, and only parties that advertised keys."""
        last = -1
        for name in names:
            pos = self.spec.index(name)
            if pos <= last:
                raise ProtocolAbort(f"{what} must list each {item} once, in spec order")
            last = pos
            if name not in self._members:
                raise ProtocolAbort(f"{what} lists {name!r}, which never advertised keys")

    def _check_survivor_list(self, survivors: tuple[str, ...]) -> None:
        spec = self.spec
        self._check_listed(survivors, "survivor set", "participant")
        for s in survivors:
            if s in self._holders and s != self.me and s not in self._peers:
                raise ProtocolAbort(f"survivor {s!r} is a neighbour that never sent this enterprise shares")
        if self.me not in survivors:
            raise ProtocolAbort("survivor set must include this enterprise, which uploaded")
        unprobed = [s for s in survivors if spec.probes and s not in self._probed]
        if unprobed:
            raise ProtocolAbort(
                f"survivor set names uploads the probe request did not list {unprobed[:3]}: "
                "every upload in the sum must have been norm-checked"
            )
        others = sum(1 for s in survivors if s != self.me and s in self._peers)
        if others < spec.threshold:
            raise ProtocolAbort(
                f"survivor set names {others} share holders besides this enterprise, below the "
                f"threshold {spec.threshold} (this enterprise never counts itself)"
            )
        if len(survivors) < spec.quorum:
            raise ProtocolAbort(
                f"survivor set names {len(survivors)} participants, below the threshold {spec.quorum}"
            )

    def _consistency(self, req: ConsistencyRequest) -> bytes:
        self._check_sid(req.session_id)
        self._check_survivor_list(req.survivors)
        self._signed_survivors = req.survivors
        sig = self._identity.sign(
            consistency_signed_bytes(session_id=self._sid, round_number=self.spec.round_number, survivors=req.survivors)
        )
        self.stage = Stage.UNMASK
        return ConsistencySignature(self.spec.round_number, self._sid, self.me, sig).to_bytes()

    def _unmask(self, req: UnmaskRequest) -> bytes:
        spec = self.spec
        self._check_sid(req.session_id)
        if req.survivors != self._signed_survivors:
            raise ProtocolAbort("unmask request's survivor set differs from the set this enterprise signed")
        survivors = frozenset(req.survivors)
        signed = consistency_signed_bytes(session_id=self._sid, round_number=spec.round_number, survivors=req.survivors)
        signers: set[str] = set()
        for signer, sig in req.signatures:
            if signer == self.me:
                raise ProtocolAbort(
                    "consistency signatures must come from others: this enterprise's own never "
                    "counts toward the threshold"
                )
            if signer in signers or signer not in survivors:
                raise ProtocolAbort(f"consistency signature from {signer!r} is not from a distinct survivor")
            verify_signature(self._roster[signer], sig, signed)
            signers.add(signer)
        mine = len(signers & self._holders)
        if mine < spec.threshold:
            raise ProtocolAbort(
                f"unmask request carries {mine} valid consistency signatures from share holders "
                f"besides this enterprise, below the threshold {spec.threshold}"
            )
        # Per owner too: a share of o leaves only if t of o's own share holders (not this one)
        # signed the same set. Two honest groups shown different sets then each need t + 1 - |C|
        # members inside o's neighbourhood (spec.tolerated_colluders).
        for o in (*req.self_mask_of, *req.mask_key_of):
            near = self._graph.get(o, frozenset()) | {o}
            count = len(signers & near)
            if count < spec.threshold:
                raise ProtocolAbort(
                    f"unmask request carries {count} consistency signatures from share holders of "
                    f"{o!r} besides this enterprise, below the threshold {spec.threshold}"
                )
        both = set(req.self_mask_of) & set(req.mask_key_of)
        if both:
            raise ProtocolAbort(f"unmask request asks both shares of {sorted(both)[:3]}")
        if len(set(req.self_mask_of)) != len(req.self_mask_of) or len(set(req.mask_key_of)) != len(req.mask_key_of):
            raise ProtocolAbort("unmask request repeats an owner")
        not_survivor = [o for o in req.self_mask_of if o not in survivors]
        if not_survivor:
            raise ProtocolAbort(f"unmask request asks self-mask shares of non-survivors {not_survivor[:3]}")
        survivor_keys = [o for o in req.mask_key_of if o in survivors]
        if survivor_keys:
            raise ProtocolAbort(f"unmask request asks mask-key shares of survivors {survivor_keys[:3]}")
        unknown = [o for o in (*req.self_mask_of, *req.mask_key_of) if o not in self._held]
        if unknown:
            raise ProtocolAbort(f"unmask request asks shares this enterprise does not hold {unknown[:3]}")
        out = [(o, SHARE_KIND_SELF_MASK, self._held[o][0].to_bytes()) for o in req.self_mask_of]
        out += [(o, SHARE_KIND_MASK_KEY, self._held[o][1].to_bytes()) for o in req.mask_key_of]
        self._forget_secrets()
        self.stage = Stage.CONTRIBUTE if spec.probes else Stage.DONE
        return UnmaskResponse(spec.round_number, self._sid, self.me, tuple(out)).to_bytes()

    def _sum_bound(self, members: int) -> tuple[float, str] | None:
        """The bound the decoded sum of ``members`` inputs is checked against, and its source;
        ``None`` when the round declares none (clip_bound 0 and no bounded noise hook)."""
        spec = self.spec
        hook_bound = getattr(self._noise_hook, "sum_l2_bound", None)
        if self._noise_hook is not None and spec.mode in MASK_MODES:
            if hook_bound is None:
                return None  # a bare hook may add anything: this site cannot bound its own sum
            # The hook re-clips and re-grids every input and adds noise; its bound covers both.
            return float(hook_bound(spec=spec, members=members)), f"{members} members' clipped inputs + noise shares"
        if spec.clip_bound <= 0:
            return None
        bound = sum_norm_bound(
            members=members, clip_bound=spec.clip_bound, vector_length=spec.vector_length,
            scale_bits=spec.scale_bits,
        )
        if spec.mode == "ckks":
            # The decrypted sum is rounded to the grid: at most one step per coordinate beyond
            # the sum of the quantised uploads when the CKKS error stays below 1.5 steps.
            bound += math.sqrt(spec.vector_length) * 2.0**-spec.scale_bits
        return bound, f"{members} x clip bound {spec.clip_bound:.6g} + rounding"

    def _masked_result(self, agg: MaskedAggregate) -> None:
        spec = self.spec
        self._check_sid(agg.session_id)
        if agg.survivors != self._signed_survivors:
            raise ProtocolAbort("aggregate's survivor set differs from the signed set")
        total = decode_aggregate(spec, agg).aggregate
        # The coordinator alone unmasks, so it could return any vector; honest inputs are
        # clipped, so anything longer than the survivors' inputs can be is refused.
        bound = self._sum_bound(len(agg.survivors))
        if bound is not None:
            check_sum_norm(total, bound=bound[0], what=bound[1])
        self._result = ParticipantResult(total, agg.survivors)

    def _ckks_upload(self) -> bytes:
        from secfed.crypto import ckks

        assert self._update is not None
        started = self._clock() if self._clock else 0.0
        # Quantised to the round's fixed-point grid before encryption, like a masked upload:
        # the rounded decryption of the sum is then exactly the sum of these (round_to_grid).
        grid = round_to_grid(self._update.astype(np.float64), self.spec.scale_bits)
        cts = tuple(ckks.encrypt(self._ckks, grid, workers=self._workers))
        digest = ciphertext_digest(cts)
        sig = self._identity.sign(
            ckks_upload_signed_bytes(
                session_id=self._sid, round_number=self.spec.round_number, sender=self.me,
                ledger_head=self._ledger_head, ct_digest=digest,
            )
        )
        if self._clock:
            self.timings["protect"] = self._clock() - started
        self._update = None
        self.stage = Stage.DONE
        return CkksUpload(self.spec.round_number, self._sid, self.me, self._ledger_head, cts, sig).to_bytes()

    def _ckks_result(self, agg: CkksAggregate) -> None:
        """Verify every member's signed upload, add them here, decrypt and round the sum
        (:func:`open_ckks_aggregate`), then check its norm against the members' clip bound."""
        spec = self.spec
        self._check_sid(agg.session_id)
        members = tuple(m[0] for m in agg.members)
        if self.me not in members:
            raise ProtocolAbort("aggregate's member set must include this enterprise, which uploaded")
        if len(members) < spec.min_participants:
            raise ProtocolAbort(
                f"aggregate holds {len(members)} members, below the minimum {spec.min_participants}"
            )
        for sender in members:
            if sender not in self._members:
                raise ProtocolAbort(f"aggregate member {sender!r} never advertised in this round")
        total = decode_aggregate(
            spec, agg, ckks_context=self._ckks, roster=self._roster,
            order={p: spec.index(p) for p in members},
        ).aggregate
        bound = self._sum_bound(len(members))
        if bound is not None:
            check_sum_norm(total, bound=bound[0], what=bound[1])
        self._result = ParticipantResult(total, members)
