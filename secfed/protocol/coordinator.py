"""The coordinator's side of a round: pure state, no secrets, rebuildable from its transcript.

``receive`` validates a message completely before it touches state, so a rejected message leaves
the round unchanged. ``close_stage`` moves to the next stage and returns the per-recipient
payloads; it raises :class:`ProtocolAbort` naming the stage and the counts when fewer parties
than the round's quorum remain. Everything the coordinator learns it could publish: masked
vectors, sealed shares, and at the end exactly the shares the unmasking needs.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from secfed.crypto.encoding import decode, ring_dtype
from secfed.crypto.keys import (
    LABEL_PAIRWISE_MASK,
    LABEL_SELF_MASK,
    X25519KeyPair,
    agree,
    constant_time_equal,
    derive_key,
    verify_signature,
)
from secfed.crypto.masking import DEFAULT_WORKERS, apply_masks
from secfed.crypto.shamir import Share, combine_shares
from secfed.errors import (
    CkksError,
    MessageFormatError,
    ProtocolAbort,
    ProtocolError,
    ShamirError,
)
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
    ProbeReport,
    ProbeRequest,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
    coin_commitment,
    consistency_signed_bytes,
    decode_message,
    seed_commitment,
)
from secfed.protocol.participant import contribution_bound, probe_limit, ring_bytes
from secfed.protocol.probes import (
    centered,
    contribution_vector,
    fold_sources,
    folded_products,
    norm_estimate,
    probe_basis,
    probe_products,
    probe_seed,
    ring_dot,
    signed_dot,
    upload_digest,
)
from secfed.protocol.roster import CommittedRoster, commit_roster
from secfed.protocol.spec import (
    MASK_MODES,
    RoundSpec,
    Stage,
    graph_seed,
    neighbour_graph,
    session_id,
)

__all__ = ["CoordinatorRound", "CoordinatorResult", "ProbeOutcome", "SEALED_SHARE_BYTES"]

SEALED_SHARE_BYTES = 12 + 70 + 16  # GCM nonce + two 35-byte shares + tag


@dataclass(frozen=True, slots=True)
class ProbeOutcome:
    """What the probes of one round established (``spec.probes`` > 0).

    ``norm_estimates``: every probed uploader -> its JL estimate of ``||u_i||``; ``excluded``:
    those above ``limit`` (margin x bound), treated as dropped (their self-mask seed never
    revealed); ``revealed``: every probed uploader -> the ``<u_i, v_j>`` it revealed (centered
    ring integers at scale 2^scale_bits). ``contributions``: survivor -> ``<u_i, U>/<U, U>``
    (filled once the contribute stage closes; see :meth:`CoordinatorRound._close_contribute`
    for ``unverified``, ``disputed`` and ``without_share``); ``contribution_terms``: survivor
    -> the one scalar ``<u_i, U'>`` revealed for it (scale 2^(scale_bits + contribution_scale)).
    """

    probes: int
    limit: float
    norm_estimates: Mapping[str, float]
    excluded: tuple[str, ...]
    revealed: Mapping[str, tuple[int, ...]]
    contributions: Mapping[str, float] = field(default_factory=dict)
    contribution_terms: Mapping[str, int] = field(default_factory=dict)
    contribution_scale: int = 0
    unverified: tuple[str, ...] = ()
    disputed: tuple[str, ...] = ()
    without_share: tuple[str, ...] = ()

    def to_json(self) -> str:
        """Canonical JSON (sorted keys) of every field, for the coordinator's transcript."""
        fields = {name: getattr(self, name) for name in self.__dataclass_fields__}
        return json.dumps(
            {k: (list(v) if isinstance(v, tuple) else dict(v) if isinstance(v, Mapping) else v)
             for k, v in fields.items()},
            sort_keys=True,
        )


@dataclass(frozen=True, slots=True)
class CoordinatorResult:
    """What the coordinator ends with.

    Mask modes: ``aggregate`` (float64 sum) and ``ring_sum``. CKKS: ``ciphertexts`` (the
    encrypted sum, which it cannot decrypt). ``ledger_heads`` maps each contributor to the
    opaque ledger-head bytes of its upload (for the transcript).
    """

    survivors: tuple[str, ...]
    aggregate: npt.NDArray[np.float64] | None
    ring_sum: npt.NDArray[np.unsignedinteger] | None
    ciphertexts: tuple[bytes, ...] | None
    ledger_heads: Mapping[str, bytes]
    probes: ProbeOutcome | None = None


class CoordinatorRound:
    """The coordinator of one round.

    Args:
        spec: the round.
        roster: enterprise id -> pinned Ed25519 public key.
        ckks_public_context: serialized public-only CKKS context (ckks mode).
        workers: threads for mask removal.
        clock: optional ``() -> seconds``; when given, :attr:`timings` records ``unmask`` (seed
            recovery, mask removal, decoding) or, for ckks, ``aggregate`` (homomorphic additions,
            done as uploads arrive).
        keep_records: keep every accepted payload in :attr:`records` (for :meth:`replay`). A
            driver that persists each accepted payload itself passes ``False``: the masked
            uploads are then summed and dropped, so memory stays O(d + n k), not O(n d).
        head_check: optional ``(sender, ledger_head) -> None`` the driver uses to hold each
            upload's ledger head to its rules (signature, strictly increasing index); called
            after the upload's signature verifies and before the upload touches the sum, so a
            refusal (any :class:`ProtocolError`) leaves the round unchanged.
    """

    def __init__(
        self,
        spec: RoundSpec,
        *,
        roster: Mapping[str, bytes],
        ckks_public_context: bytes | None = None,
        workers: int = DEFAULT_WORKERS,
        clock: Callable[[], float] | None = None,
        keep_records: bool = True,
        head_check: Callable[[str, bytes], None] | None = None,
    ) -> None:
        spec.validate()
        self._head_check = head_check
        self._clock = clock
        self._keep_records = keep_records
        self.timings: dict[str, float] = {}
        missing = [p for p in spec.participants if p not in roster]
        if missing:
            raise ProtocolError(f"roster must pin every participant (missing {missing[:3]})")
        if spec.mode == "ckks" and ckks_public_context is None:
            raise ProtocolError("mode ckks needs the public CKKS context")
        self.spec = spec
        self._spec_digest = spec.digest()  # O(n) to compute; checked on every advertisement
        self._consistency_bytes = b""  # what survivors sign; fixed when the upload stage closes
        self._roster = dict(roster)
        self._ckks_ctx: object = None
        if spec.mode == "ckks":
            from secfed.crypto import ckks

            try:
                self._ckks_ctx = ckks.load_context(ckks_public_context, expect_secret=False)
            except CkksError as exc:
                raise ProtocolError(f"ckks_public_context is unusable: {exc}") from exc
            self._n_ciphertexts = int(ckks.n_ciphertexts(spec.vector_length))
        self._workers = workers
        self.stage = Stage.ADVERTISE
        self.records: list[tuple[str, str, bytes]] = []  # accepted (stage, sender, payload)
        self._expected: frozenset[str] = frozenset(spec.participants)
        self._adverts: dict[str, AdvertiseKeys] = {}
        self._sid = b""
        self._committed: CommittedRoster | None = None  # secagg+: the roster's Merkle commitment
        self._graph: dict[str, frozenset[str]] = {}
        self._coins: dict[str, bytes] = {}  # secagg+: revealed graph coins
        self._shares: dict[str, ShareKeys] = {}
        self._u2: tuple[str, ...] = ()
        self._acc: npt.NDArray[np.unsignedinteger] | None = None
        self._uploaders: list[str] = []
        self._heads: dict[str, bytes] = {}
        # head, ciphertexts, signature: kept whole, because participants add them themselves
        self._ckks_uploads: dict[str, tuple[bytes, tuple[bytes, ...], bytes]] = {}
        self._ckks_sum: list[bytes] | None = None
        self._survivors: tuple[str, ...] = ()
        self._consistency: dict[str, bytes] = {}
        self._asked: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {}
        self._unmask: dict[str, UnmaskResponse] = {}
        self._result: CoordinatorResult | None = None
        # Probed rounds: every masked upload is kept (O(n d)) until the contribute stage closes,
        # because excluded uploads leave the sum and each survivor's <y_i, U'> is needed.
        self._uploads: dict[str, npt.NDArray[np.unsignedinteger]] = {}
        self._upload_digests: dict[str, bytes] = {}  # probed rounds: hashed as each arrives
        self._probe_seed = b""
        self._probe_reports: dict[str, ProbeReport] = {}
        # uploader -> <y_i, v_j> for the k probes: see prepare_probes; None until computed
        self._probe_masked: dict[str, tuple[int, ...]] | None = None
        self._probe: ProbeOutcome | None = None
        self._contrib: dict[str, ContributionReport] = {}
        # (s', <U, U'>, survivor -> <upload less its known masks, U'>): see
        # prepare_contributions; None until computed
        self._contrib_base: tuple[int, float, dict[str, int]] | None = None
        self._dropped_pairs: list[tuple[str, str, bytes]] = []  # (survivor, dropped, pair seed)

    # -- public API ---------------------------------------------------------------------------
    @property
    def session_id(self) -> bytes:
        return self._sid

    def neighbourhood(self, member: str) -> frozenset[str] | None:
        """secagg+: ``member`` and its neighbours once the coins fixed the graph -- whose signed
        confirmations of the result ``member`` checks (k + 1 parties). ``None`` in ``secagg``
        and ``ckks`` (every party checks every party) or before the graph is fixed."""
        if self.spec.mode != "secagg+" or member not in self._graph:
            return None
        return self._graph[member] | {member}

    def expected(self) -> frozenset[str]:
        """Who the current stage still waits for."""
        return self._expected - self._received()

    def complete(self) -> bool:
        """True when everyone expected in this stage has been heard."""
        return not self.expected()

    def received(self) -> frozenset[str]:
        """Who has sent an accepted message in the current stage."""
        return self._received()

    def receive(self, sender: str, payload: bytes) -> None:
        """Validate and accept ``sender``'s message for the current stage.

        Raises:
            MessageFormatError: malformed bytes.
            InvalidSignature: a signature did not verify against the pinned key.
            ProtocolError: a well-formed message that must not be accepted now (wrong stage,
                round, session, sender, duplicate). The state is unchanged in every case.
        """
        if self.stage in (Stage.DONE, Stage.ABORTED):
            raise ProtocolError(f"round is {self.stage.value}; no message is accepted")
        if sender not in self._expected:
            raise ProtocolError(f"sender {sender!r} is not expected in stage {self.stage.value}")
        if sender in self._received():
            raise ProtocolError(f"sender {sender!r} already sent its {self.stage.value} message")
        message = decode_message(payload)
        if message.round_number != self.spec.round_number:
            raise ProtocolError(
                f"round_number must be {self.spec.round_number} (got {message.round_number}): "
                "a message from another round is refused"
            )
        self._accept(sender, message)
        if self._keep_records:
            self.records.append((self.stage.value, sender, bytes(payload)))

    def close_stage(self) -> dict[str, bytes]:
        """End the current stage; returns the next stage's payload for each recipient.

        Raises:
            ProtocolAbort: fewer parties than the quorum remain (names stage and counts).
        """
        stage = self.stage
        close = self._CLOSERS.get(stage)
        if close is None:
            raise ProtocolError(f"no stage to close (stage is {stage.value})")
        try:
            return close(self)
        except ProtocolAbort as exc:
            self.stage = Stage.ABORTED
            if exc.stage is None:
                exc.stage = stage.value
            raise

    def result(self) -> CoordinatorResult:
        if self._result is None:
            raise ProtocolError(f"round is not done (stage is {self.stage.value})")
        return self._result

    @classmethod
    def replay(
        cls,
        spec: RoundSpec,
        *,
        roster: Mapping[str, bytes],
        records: Iterable[tuple[str, str, bytes]],
        ckks_public_context: bytes | None = None,
        workers: int = DEFAULT_WORKERS,
        head_check: Callable[[str, bytes], None] | None = None,
    ) -> CoordinatorRound:
        """Rebuild a coordinator after a crash from its accepted ``(stage, sender, payload)`` records."""
        round_ = cls(spec, roster=roster, ckks_public_context=ckks_public_context, workers=workers,
                     head_check=head_check)
        for stage, sender, payload in records:
            target = Stage(stage)
            while round_.stage is not target:
                if round_.stage in (Stage.DONE, Stage.ABORTED):
                    raise ProtocolError(f"record for stage {stage} comes after the round ended")
                round_.close_stage()
            round_.receive(sender, payload)
        return round_

    # -- internals ----------------------------------------------------------------------------
    def _received(self) -> frozenset[str]:
        # each stage's accepted messages, keyed by sender (upload: by mode)
        by_stage: dict[Stage, Mapping[str, object]] = {
            Stage.ADVERTISE: self._adverts,
            Stage.REVEAL: self._coins,
            Stage.SHARE: self._shares,
            Stage.UPLOAD: self._ckks_uploads if self.spec.mode == "ckks" else self._heads,
            Stage.PROBE: self._probe_reports,
            Stage.CONSISTENCY: self._consistency,
            Stage.UNMASK: self._unmask,
            Stage.CONTRIBUTE: self._contrib,
        }
        return frozenset(by_stage.get(self.stage, ()))

    def _quorum(self, count: int, what: str) -> None:
        if count < self.spec.quorum:
            raise ProtocolAbort(
                f"stage {self.stage.value}: {count} of {len(self.spec.participants)} participants {what}, "
                f"below the threshold {self.spec.quorum}",
                stage=self.stage.value,
            )

    def _check(self, sender: str, claimed: str, sid: bytes | None) -> None:
        if claimed != sender:
            raise ProtocolError(f"message names sender {claimed!r} but came from {sender!r}")
        if sid is not None and sid != self._sid:
            raise ProtocolError("session_id does not match this round's session")

    def _accept(self, sender: str, m: Message) -> None:
        """Check ``m`` from ``sender`` against the open stage and keep it (one acceptor per
        stage and message type, :attr:`_ACCEPTORS`)."""
        for stage, kind, accept in self._ACCEPTORS:
            if self.stage is stage and isinstance(m, kind):
                accept(self, sender, m)
                return
        raise ProtocolError(f"message {type(m).__name__} is not accepted in stage {self.stage.value}")

    def _accept_advert(self, sender: str, m: AdvertiseKeys) -> None:
        spec = self.spec
        self._check(sender, m.sender, None)
        if m.spec_digest != self._spec_digest:
            raise ProtocolError("advertisement is for another round spec")
        key_len = 32 if spec.mode in MASK_MODES else 0
        if len(m.cipher_key) != key_len or len(m.mask_key) != key_len:
            raise ProtocolError(f"advertisement must carry {key_len}-byte keys")
        commit_len = 32 if spec.mode == "secagg+" else 0
        if len(m.coin_commitment) != commit_len:
            raise ProtocolError(
                f"advertisement must carry a {commit_len}-byte coin commitment in mode "
                f"{spec.mode} (got {len(m.coin_commitment)})"
            )
        verify_signature(self._roster[sender], m.signature, m.signed_bytes())
        self._adverts[sender] = m

    def _accept_coin(self, sender: str, m: CoinReveal) -> None:
        self._check(sender, m.sender, m.session_id)
        committed = self._adverts[sender].coin_commitment
        if not constant_time_equal(
            coin_commitment(spec_digest=self._spec_digest, sender=sender, coin=m.coin), committed
        ):
            raise ProtocolError(f"coin of {sender!r} does not match the commitment in its advert")
        self._coins[sender] = m.coin

    def _accept_shares(self, sender: str, m: ShareKeys) -> None:
        self._check(sender, m.sender, m.session_id)
        neighbours = self._graph[sender] & self._adverts.keys()
        got = [r for r, _ in m.sealed]
        if len(set(got)) != len(got) or set(got) != neighbours:
            raise ProtocolError(f"shares from {sender!r} must go to each advertised neighbour once")
        if any(len(blob) != SEALED_SHARE_BYTES for _, blob in m.sealed):
            raise ProtocolError(f"sealed shares must be {SEALED_SHARE_BYTES} bytes")
        self._shares[sender] = m

    def _accept_masked_upload(self, sender: str, m: MaskedUpload) -> None:
        spec = self.spec
        self._check(sender, m.sender, m.session_id)
        width = spec.ring_bits // 8
        if m.ring_bits != spec.ring_bits or len(m.vector) != spec.vector_length * width:
            raise ProtocolError(
                f"masked upload must hold {spec.vector_length} words of Z_2^{spec.ring_bits} "
                f"(got {len(m.vector)} bytes at ring_bits {m.ring_bits})"
            )
        # The signature binds the ledger head to this session, round and vector; the vector's
        # SHA-256 also feeds a probed round's probe seed (hashed once).
        digest = upload_digest(m.vector)
        verify_signature(self._roster[sender], m.signature, m.signed_bytes(digest))
        if self._head_check is not None:
            self._head_check(sender, m.ledger_head)
        vec = np.frombuffer(m.vector, dtype=np.dtype(f"<u{width}"))
        if self._acc is None:
            self._acc = np.zeros(spec.vector_length, dtype=ring_dtype(spec.ring_bits))
        np.add(self._acc, vec, out=self._acc, casting="unsafe")
        if spec.probes:
            self._uploads[sender] = vec
            self._upload_digests[sender] = digest
        self._heads[sender] = m.ledger_head

    def _accept_ckks_upload(self, sender: str, m: CkksUpload) -> None:
        spec = self.spec
        self._check(sender, m.sender, m.session_id)
        # Signature first, over the raw bytes: nothing is parsed before it verifies.
        verify_signature(self._roster[sender], m.signature, m.signed_bytes())
        if len(m.ciphertexts) != self._n_ciphertexts:
            raise ProtocolError(
                f"ckks upload must hold {self._n_ciphertexts} ciphertexts (got {len(m.ciphertexts)})"
            )
        if self._head_check is not None:
            self._head_check(sender, m.ledger_head)
        # Then fold it into the running encrypted sum: a ciphertext that does not parse or
        # has other parameters is rejected here (CkksError), so it cannot spoil the round.
        from secfed.crypto import ckks

        started = self._clock() if self._clock else 0.0
        parts = [list(m.ciphertexts)] if self._ckks_sum is None else [self._ckks_sum, list(m.ciphertexts)]
        total = ckks.add_encrypted(self._ckks_ctx, parts, length=spec.vector_length, workers=self._workers)
        if self._clock:
            self.timings["aggregate"] = self.timings.get("aggregate", 0.0) + self._clock() - started
        self._ckks_sum = list(total)
        self._ckks_uploads[sender] = (m.ledger_head, m.ciphertexts, m.signature)
        self._heads[sender] = m.ledger_head

    def _accept_probe_report(self, sender: str, m: ProbeReport) -> None:
        spec = self.spec
        self._check(sender, m.sender, m.session_id)
        if len(m.self_terms) != spec.probes:
            raise ProtocolError(
                f"probe report of {sender!r} must carry {spec.probes} terms (got {len(m.self_terms)})"
            )
        if [p for p, _ in m.pair_terms] != self._mask_peers(sender):
            raise ProtocolError(
                f"probe report of {sender!r} must cover each peer whose mask its upload "
                "carries once, in spec order"
            )
        modulus = 1 << spec.ring_bits
        if any(t >= modulus for t in m.self_terms) or any(
            t >= modulus for _, terms in m.pair_terms for t in terms
        ):
            raise ProtocolError(f"probe report of {sender!r} holds a term outside Z_2^{spec.ring_bits}")
        self._probe_reports[sender] = m

    def _accept_contribution(self, sender: str, m: ContributionReport) -> None:
        spec = self.spec
        self._check(sender, m.sender, m.session_id)
        surviving = [p for p in self._mask_peers(sender) if p in set(self._survivors)]
        if [p for p, _ in m.pair_terms] != surviving:
            raise ProtocolError(
                f"contribution report of {sender!r} must cover each surviving peer once, in spec order"
            )
        if any(t >= 1 << spec.ring_bits for _, t in m.pair_terms):
            raise ProtocolError(f"contribution report of {sender!r} holds a term outside Z_2^{spec.ring_bits}")
        self._contrib[sender] = m

    def _accept_consistency(self, sender: str, m: ConsistencySignature) -> None:
        self._check(sender, m.sender, m.session_id)
        verify_signature(self._roster[sender], m.signature, self._consistency_bytes)
        self._consistency[sender] = m.signature

    def _accept_unmask(self, sender: str, m: UnmaskResponse) -> None:
        spec = self.spec
        self._check(sender, m.sender, m.session_id)
        self_of, key_of = self._asked[sender]
        want = [(o, SHARE_KIND_SELF_MASK) for o in self_of] + [(o, SHARE_KIND_MASK_KEY) for o in key_of]
        if [(o, k) for o, k, _ in m.shares] != want:
            raise ProtocolError(f"unmask response of {sender!r} must answer exactly what was asked")
        x = spec.index(sender) + 1
        for _, _, raw in m.shares:
            try:
                share = Share.from_bytes(raw)
            except ShamirError as exc:
                raise MessageFormatError(f"unmask response of {sender!r}: {exc}") from exc
            if share.x != x:
                raise ProtocolError(f"share from {sender!r} must be at x={x} (got {share.x})")
        self._unmask[sender] = m

    # Which message each stage takes, and the method that checks and keeps it.
    _ACCEPTORS: ClassVar[tuple[tuple[Stage, type[Any], Callable[[Any, str, Any], None]], ...]] = (
        (Stage.ADVERTISE, AdvertiseKeys, _accept_advert),
        (Stage.REVEAL, CoinReveal, _accept_coin),
        (Stage.SHARE, ShareKeys, _accept_shares),
        (Stage.UPLOAD, MaskedUpload, _accept_masked_upload),
        (Stage.UPLOAD, CkksUpload, _accept_ckks_upload),
        (Stage.PROBE, ProbeReport, _accept_probe_report),
        (Stage.CONTRIBUTE, ContributionReport, _accept_contribution),
        (Stage.CONSISTENCY, ConsistencySignature, _accept_consistency),
        (Stage.UNMASK, UnmaskResponse, _accept_unmask),
    )

    def _close_advertise(self) -> dict[str, bytes]:
        spec = self.spec
        self._quorum(len(self._adverts), "advertised keys")
        order = [p for p in spec.participants if p in self._adverts]
        self._adverts = {p: self._adverts[p] for p in order}
        self._expected = frozenset(order)
        if spec.mode == "secagg+":
            # Each member gets the committed roster (O(log n)), not every advert: it checks its
            # neighbours' adverts against the commitment once the coins fix the graph.
            self._committed = commit_roster(spec, self._adverts, self._roster)
            self._sid = self._committed.session_id
            self.stage = Stage.REVEAL  # the graph waits for every coin
            return {p: self._committed.commitment_for(p).to_bytes() for p in order}
        self._sid = session_id(
            spec, [(p, self._roster[p], a.cipher_key, a.mask_key) for p, a in self._adverts.items()],
        )
        payload = KeyRoster(spec.round_number, tuple(self._adverts.values())).to_bytes()
        if spec.mode == "secagg":
            self._graph = neighbour_graph(spec, self._sid)
            self.stage = Stage.SHARE
        else:
            self.stage = Stage.UPLOAD
        return {p: payload for p in order}

    def _close_reveal(self) -> dict[str, bytes]:
        spec = self.spec
        missing = [p for p in self._adverts if p not in self._coins]
        if missing:
            # Never exclude a party once coins are known: that would let colluders choose the
            # graph among 2^c outcomes by withholding reveals. The round aborts instead.
            raise ProtocolAbort(
                f"stage reveal: {len(missing)} of {len(self._adverts)} key-roster members did not "
                f"reveal their graph coin ({missing[:3]}); a secagg+ round aborts rather than "
                "exclude a party after the reveal",
                stage="reveal",
            )
        coins = tuple(self._coins[p] for p in self._adverts)
        self._graph = neighbour_graph(spec, graph_seed(self._sid, coins))
        self.stage = Stage.SHARE
        self._expected = frozenset(self._adverts)
        assert self._committed is not None
        return {p: self._committed.neighbours_for(p, coins, self._graph[p]).to_bytes() for p in self._adverts}

    def _close_share(self) -> dict[str, bytes]:
        spec = self.spec
        self._quorum(len(self._shares), "sent shares")
        self._u2 = tuple(p for p in spec.participants if p in self._shares)
        inbox: dict[str, list[tuple[str, bytes]]] = {p: [] for p in self._u2}
        for sender in self._u2:
            for receiver, blob in self._shares[sender].sealed:
                if receiver in inbox:
                    inbox[receiver].append((sender, blob))
        self.stage = Stage.UPLOAD
        self._expected = frozenset(self._u2)
        return {
            p: ForwardedShares(spec.round_number, self._sid, p, tuple(items)).to_bytes()
            for p, items in inbox.items()
        }

    def _close_upload(self) -> dict[str, bytes]:
        spec = self.spec
        if spec.mode == "ckks":
            return self._close_ckks()
        self._quorum(len(self._heads), "uploaded")
        uploaders = tuple(p for p in spec.participants if p in self._heads)
        if spec.probes:
            # The probes are fixed here, by every upload's digest: none existed before this.
            digests = tuple((p, self._upload_digests[p]) for p in uploaders)
            self._probe_seed = probe_seed(self._sid, digests)
            self.stage = Stage.PROBE
            self._expected = frozenset(uploaders)
            request = ProbeRequest(spec.round_number, self._sid, spec.probes, digests).to_bytes()
            return {p: request for p in uploaders}
        return self._request_consistency(uploaders)

    def _mask_peers(self, owner: str) -> list[str]:
        """Peers whose pairwise mask ``owner``'s upload carries: neighbours that sent shares."""
        u2 = set(self._u2)
        return [p for p in self.spec.participants if p in self._graph[owner] and p in u2]

    def _close_probe(self) -> dict[str, bytes]:
        """Check the pair reports, estimate every reporter's norm, drop the uploads above the
        limit (and those that did not report) from the sum, then ask for consistency."""
        spec = self.spec
        self._quorum(len(self._probe_reports), "sent probe reports")
        reporters = [p for p in spec.participants if p in self._probe_reports]
        pairs = {p: dict(self._probe_reports[p].pair_terms) for p in reporters}
        for i in reporters:
            for peer, terms in pairs[i].items():
                if peer in pairs and spec.index(i) < spec.index(peer) and pairs[peer][i] != terms:
                    raise ProtocolAbort(
                        f"stage probe: the pair reports of {i!r} and {peer!r} disagree: one of "
                        "them misreported its pairwise mask; the round is aborted",
                        stage="probe",
                    )
        self.prepare_probes()
        assert self._probe_masked is not None
        masked = [self._probe_masked[p] for p in reporters]
        modulus = 1 << spec.ring_bits
        estimates: dict[str, float] = {}
        revealed: dict[str, tuple[int, ...]] = {}
        for i, y in zip(reporters, masked):
            pos = spec.index(i)
            own = self._probe_reports[i].self_terms
            inner: list[int] = []
            for j in range(spec.probes):
                value = y[j] - own[j]
                for peer, pterms in pairs[i].items():
                    value -= pterms[j] if pos < spec.index(peer) else -pterms[j]
                inner.append(value % modulus)
            revealed[i] = tuple(centered(t, spec.ring_bits) for t in inner)
            estimates[i] = norm_estimate(inner, ring_bits=spec.ring_bits, scale_bits=spec.scale_bits)
        limit = probe_limit(spec)
        excluded = tuple(p for p in reporters if estimates[p] > limit)
        self._probe = ProbeOutcome(spec.probes, limit, estimates, excluded, revealed)
        keep = [p for p in reporters if p not in excluded]
        assert self._acc is not None
        for p in spec.participants:
            if p in self._uploads and p not in keep:
                # Excluded or silent: its upload leaves the sum, and it is treated as dropped.
                np.subtract(self._acc, self._uploads.pop(p), out=self._acc)
        return self._request_consistency(tuple(keep))

    def prepare_probes(self) -> None:
        """Every upload's products with the round's k probes, ``<y_i, v_j>``, computed once the
        probe seed exists (stage probe), so the service can run them while the sites compute
        their reports rather than after the last one arrives. Idempotent; :meth:`close_stage`
        computes them when not done. Reads only the uploads, which nothing changes at this
        stage (reports are kept apart), so it may run beside :meth:`receive`."""
        if self._probe_masked is not None or self.stage is not Stage.PROBE:
            return
        spec = self.spec
        owners = [p for p in spec.participants if p in self._uploads]
        products = probe_products(
            [self._uploads[p] for p in owners], seed=self._probe_seed, k=spec.probes,
            ring_bits=spec.ring_bits, length=spec.vector_length, workers=self._workers,
        )
        self._probe_masked = dict(zip(owners, products))

    def _request_consistency(self, survivors: tuple[str, ...]) -> dict[str, bytes]:
        spec = self.spec
        self._quorum(len(survivors), "remain in the sum")
        self._survivors = survivors
        self._consistency_bytes = consistency_signed_bytes(
            session_id=self._sid, round_number=spec.round_number, survivors=self._survivors
        )
        self.stage = Stage.CONSISTENCY
        self._expected = frozenset(self._survivors)
        payload = ConsistencyRequest(spec.round_number, self._sid, self._survivors).to_bytes()
        return {p: payload for p in self._survivors}

    def _knows(self, holder: str) -> frozenset[str]:
        """Owners whose shares ``holder`` received: itself and its neighbours that sent shares."""
        return frozenset({p for p in self._graph[holder] if p in self._shares} | {holder})

    def _close_consistency(self) -> dict[str, bytes]:
        spec = self.spec
        self._quorum(len(self._consistency), "signed the survivor set")
        survivors = set(self._survivors)
        dropped = {p for p in self._u2 if p not in survivors}
        out: dict[str, bytes] = {}
        signed = frozenset(self._consistency)
        for holder in self._survivors:
            if holder not in self._consistency:
                continue
            # A holder counts only others' signatures: t of its own share holders, and t of the
            # share holders of every owner it is asked about (participant._unmask).
            if len((self._knows(holder) & signed) - {holder}) < spec.threshold:
                continue  # this holder would (rightly) refuse: too few others confirmed the set
            knows = [
                o for o in sorted(self._knows(holder), key=spec.index)
                if len(((self._graph[o] | {o}) & signed) - {holder}) >= spec.threshold
            ]
            near = set().union(*((self._graph[o] | {o}) for o in knows)) if knows else set()
            sigs = tuple(
                (s, self._consistency[s]) for s in sorted(near & signed - {holder}, key=spec.index)
            )
            self_of = tuple(o for o in knows if o in survivors)
            key_of = tuple(o for o in knows if o in dropped and o != holder)
            self._asked[holder] = (self_of, key_of)
            out[holder] = UnmaskRequest(
                spec.round_number, self._sid, self._survivors, sigs, self_of, key_of
            ).to_bytes()
        self._quorum(len(out), "can be asked to unmask")
        self.stage = Stage.UNMASK
        self._expected = frozenset(out)
        return out

    def _combine(self, owner: str, kind: int, pool: Mapping[tuple[str, int], list[bytes]]) -> bytes:
        shares = [Share.from_bytes(raw) for raw in pool.get((owner, kind), [])]
        what = "self-mask seed" if kind == SHARE_KIND_SELF_MASK else "mask key"
        if len(shares) < self.spec.threshold:
            raise ProtocolAbort(
                f"stage unmask: {len(shares)} shares of the {what} of {owner!r} arrived, "
                f"below the threshold {self.spec.threshold}",
                stage="unmask",
            )
        return bytes(combine_shares(shares, threshold=self.spec.threshold))

    def _close_unmask(self) -> dict[str, bytes]:
        spec = self.spec
        self._quorum(len(self._unmask), "sent unmask shares")
        assert self._acc is not None
        started = self._clock() if self._clock else 0.0
        survivors = set(self._survivors)
        pool: dict[tuple[str, int], list[bytes]] = {}
        for resp in self._unmask.values():
            for o, k, raw in resp.shares:
                pool.setdefault((o, k), []).append(raw)
        masks: list[tuple[bytes, int]] = []
        for owner in self._survivors:
            seed = self._combine(owner, SHARE_KIND_SELF_MASK, pool)
            committed = self._shares[owner].seed_commitment
            if not constant_time_equal(seed_commitment(session_id=self._sid, owner=owner, seed=seed), committed):
                raise ProtocolAbort(
                    f"stage unmask: shares of the self-mask seed of {owner!r} do not match its "
                    "commitment (a share holder sent a wrong share)",
                    stage="unmask",
                )
            self_key = derive_key(seed, session_id=self._sid, purpose=LABEL_SELF_MASK)
            masks.append((self_key, -1))
        for owner in self._u2:
            if owner in survivors:
                continue
            peers = sorted(self._graph[owner] & survivors, key=spec.index)
            if not peers:
                continue
            key = X25519KeyPair.from_private_bytes(self._combine(owner, SHARE_KIND_MASK_KEY, pool))
            if key.public_bytes() != self._adverts[owner].mask_key:
                raise ProtocolAbort(f"stage unmask: shares of the mask key of {owner!r} are inconsistent")
            v_pos = spec.index(owner)
            for u in peers:
                seed = derive_key(agree(key, self._adverts[u].mask_key), session_id=self._sid, purpose=LABEL_PAIRWISE_MASK)
                # u added +PRG if u precedes owner, -PRG otherwise; remove exactly that.
                masks.append((seed, -1 if spec.index(u) < v_pos else 1))
                if spec.probes:
                    self._dropped_pairs.append((u, owner, bytes(seed)))
        acc = self._acc
        if spec.probes:
            self._unmask_probed(acc, [bytes(seed) for seed, _ in masks[: len(self._survivors)]])
        else:
            apply_masks(acc, masks, workers=self._workers)
        aggregate = decode(acc, scale_bits=spec.scale_bits)
        if self._clock:
            self.timings["unmask"] = self._clock() - started
        heads = {p: h for p, h in self._heads.items() if p in survivors}
        self._result = CoordinatorResult(self._survivors, aggregate, acc, None, heads, self._probe)
        self.stage = Stage.CONTRIBUTE if spec.probes else Stage.DONE
        self._expected = frozenset(self._survivors) if spec.probes else frozenset()
        payload = MaskedAggregate(spec.round_number, self._sid, self._survivors, spec.ring_bits, ring_bytes(acc)).to_bytes()
        return {p: payload for p in self._survivors}

    def _unmask_probed(self, acc: npt.NDArray[np.unsignedinteger], self_keys: list[bytes]) -> None:
        """Unmask a probed round: every mask the unmasking reveals (each survivor's self mask,
        in ``self_keys`` order, and each survivor's pairwise mask with a dropped or excluded
        peer) is expanded once, and each piece is both folded for the probe check and taken
        off its owner's upload. ``self._uploads`` then holds ``y_i - b_i - (masks with dropped
        peers)``, which the contribute stage needs; the reports are checked
        (:meth:`_check_probe_reports`) before ``acc`` becomes the sum of these (the survivors'
        pairwise masks among themselves cancel there), so a false report leaves no sum.
        """
        spec = self.spec
        basis = probe_basis(self._probe_seed, spec.probes, length=spec.vector_length,
                            ring_bits=spec.ring_bits)
        jobs: list[tuple[str, bytes, int]] = [(o, key, 1) for o, key in zip(self._survivors, self_keys)]
        for u, owner, seed in self._dropped_pairs:
            # u added +PRG if it precedes the dropped owner, -PRG otherwise; remove exactly that.
            jobs.append((u, seed, 1 if spec.index(u) < spec.index(owner) else -1))
        # the uploads are read-only (the messages' bytes): each survivor's rest is a new vector,
        # written from its upload by its first job (its self mask) and updated by the others
        rest = {o: np.empty(spec.vector_length, dtype=acc.dtype) for o in self._survivors}
        first = {o: True for o in self._survivors}
        sources: list[tuple[npt.NDArray[np.unsignedinteger], npt.NDArray[np.unsignedinteger], bool]] = []
        for owner, _, sign in jobs:
            sources.append((self._uploads[owner] if first[owner] else rest[owner], rest[owner], sign > 0))
            first[owner] = False

        def take_off(i: int, at: int, piece: npt.NDArray[np.unsignedinteger]) -> None:
            src, dst, minus = sources[i]
            stop = at + piece.shape[0]
            (np.subtract if minus else np.add)(src[at:stop], piece, out=dst[at:stop], casting="unsafe")

        folded = fold_sources(basis, [key for _, key, _ in jobs], each=take_off, workers=self._workers)
        self._check_probe_reports(folded_products(basis, folded))
        self._uploads = rest
        np.copyto(acc, rest[self._survivors[0]])
        for owner in self._survivors[1:]:
            np.add(acc, rest[owner], out=acc)

    def _check_probe_reports(self, products: list[tuple[int, ...]]) -> None:
        """Every mask term the unmasking lets the coordinator compute (``products``: each
        survivor's self-mask term in survivor order, then each pair term with a dropped or
        excluded peer in ``self._dropped_pairs`` order) is checked against what was reported.
        A false report aborts the round before the sum is released, naming the enterprise.

        Raises:
            ProtocolAbort: naming the enterprise whose report is false.
        """
        owners = list(self._survivors)
        for owner, got in zip(owners, products):
            if got != self._probe_reports[owner].self_terms:
                raise ProtocolAbort(
                    f"stage unmask: the self-mask probe report of {owner!r} is false (its revealed "
                    "seed gives other terms); the round is aborted and the sum discarded",
                    stage="unmask",
                )
        for (u, owner, _), got in zip(self._dropped_pairs, products[len(owners):]):
            if dict(self._probe_reports[u].pair_terms).get(owner) != got:
                raise ProtocolAbort(
                    f"stage unmask: the probe report of {u!r} on its pairwise mask with the "
                    f"dropped {owner!r} is false; the round is aborted and the sum discarded",
                    stage="unmask",
                )

    def prepare_contributions(self) -> None:
        """The coordinator's own part of the contribution shares -- the grid ``U'``, ``<U, U'>``
        and each survivor's upload less its known masks along ``U'`` -- computed once the sum
        is out (stage contribute), so the service can run it while the reports travel rather
        than after the last one. Idempotent; :meth:`close_stage` computes it when not done.
        Reads only the sum and the uploads, which nothing changes at this stage (reports are
        kept apart), so it may run beside :meth:`receive`."""
        if self._contrib_base is not None or self.stage is not Stage.CONTRIBUTE:
            return
        spec = self.spec
        assert self._result is not None and self._result.ring_sum is not None
        coarse, scale = contribution_vector(
            self._result.ring_sum, ring_bits=spec.ring_bits, scale_bits=spec.scale_bits,
            update_bound=contribution_bound(spec),
        )
        own = {i: ring_dot(self._uploads[i], coarse) for i in self._survivors}
        self._contrib_base = (scale, signed_dot(self._result.ring_sum, coarse), own)

    def _close_contribute(self) -> dict[str, bytes]:
        """Contribution shares ``<u_i, U'> / <U, U'>`` of the survivors. The sum is already
        released, so nothing here aborts: both ends of a pair whose two reports disagree get no
        share this round (``disputed``); a pair term only one end reported (the other gone) is
        used and both ends are listed ``unverified``; a survivor with a pair neither end
        reported gets no share (``without_share``)."""
        spec = self.spec
        assert self._result is not None and self._probe is not None
        self.prepare_contributions()
        assert self._contrib_base is not None
        scale, denominator, own = self._contrib_base
        reports = {p: dict(m.pair_terms) for p, m in self._contrib.items()}
        survivors = set(self._survivors)
        shares: dict[str, float] = {}
        terms: dict[str, int] = {}
        unverified: set[str] = set()
        disputed: set[str] = set()
        missing: list[str] = []
        for i in self._survivors:
            pos = spec.index(i)
            # the upload less its self mask and its masks with dropped peers (_unmask_probed)
            value = own[i]
            ok = True
            for peer in self._mask_peers(i):
                if peer not in survivors:
                    continue  # a dropped peer's mask was rebuilt above (in own)
                mine, theirs = reports.get(i, {}).get(peer), reports.get(peer, {}).get(i)
                if mine is not None and theirs is not None and mine != theirs:
                    disputed.update((i, peer))
                    ok = False
                    break
                vouched = mine if mine is not None else theirs
                if vouched is None:
                    ok = False  # neither end reported: this pair's term is unknown
                    break
                if mine is None or theirs is None:
                    unverified.add(i)  # one end vouched for it (the other was gone)
                value -= vouched if pos < spec.index(peer) else -vouched
            if not ok:
                missing.append(i)
                continue
            terms[i] = centered(value, spec.ring_bits)
            shares[i] = terms[i] / denominator if denominator else 0.0
        self._probe = replace(
            self._probe, contributions={p: v for p, v in shares.items() if p not in disputed},
            contribution_terms={p: v for p, v in terms.items() if p not in disputed},
            contribution_scale=scale,
            unverified=tuple(p for p in self._survivors if p in unverified and p not in disputed),
            disputed=tuple(p for p in self._survivors if p in disputed),
            without_share=tuple(p for p in self._survivors if p in missing or p in disputed),
        )
        self._result = replace(self._result, probes=self._probe)
        self._uploads = {}
        self._contrib_base = None
        self.stage = Stage.DONE
        self._expected = frozenset()
        return {}

    def _close_ckks(self) -> dict[str, bytes]:
        """Send every member's signed upload (not the running sum): each participant checks
        every signature and adds the ciphertexts itself, so the sum it decrypts is exactly the
        sum of the signed uploads of the members it is shown (cost: n x one upload per
        recipient). The running sum stays the coordinator's own result."""
        spec = self.spec
        self._quorum(len(self._ckks_uploads), "uploaded")
        members = tuple(p for p in spec.participants if p in self._ckks_uploads)
        assert self._ckks_sum is not None
        total = tuple(self._ckks_sum)
        self._survivors = members
        self._result = CoordinatorResult(members, None, None, total, dict(self._heads))
        self.stage = Stage.DONE
        self._expected = frozenset()
        payload = CkksAggregate(
            spec.round_number, self._sid, tuple((p, *self._ckks_uploads[p]) for p in members)
        ).to_bytes()
        return {p: payload for p in members}

    #: The method that ends each message stage (:meth:`close_stage`); the other stages have none.
    _CLOSERS: ClassVar[dict[Stage, Callable[[CoordinatorRound], dict[str, bytes]]]] = {
        Stage.ADVERTISE: _close_advertise,
        Stage.REVEAL: _close_reveal,
        Stage.SHARE: _close_share,
        Stage.UPLOAD: _close_upload,
        Stage.PROBE: _close_probe,
        Stage.CONSISTENCY: _close_consistency,
        Stage.UNMASK: _close_unmask,
        Stage.CONTRIBUTE: _close_contribute,
    }
