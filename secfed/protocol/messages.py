"""Wire messages of a round: frozen dataclasses with one versioned binary encoding.

Every message starts ``version:u8 type:u8 round_number:u64`` and then its own fields (see each
class); integers are big-endian, ids are length-prefixed UTF-8, vectors little-endian words.
:func:`decode_message` (and each ``from_bytes``) raises :class:`MessageFormatError` for any
malformed input and nothing else. Signed payloads are built by the ``*_signed_bytes`` helpers
with a distinct domain label each, so a signature for one purpose never verifies for another.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import ClassVar, TypeVar, Union

from secfed import names
from secfed.errors import MessageFormatError
from secfed.protocol.probes import MAX_PROBES
from secfed.protocol.spec import COIN_BYTES
from secfed.protocol.wire import Reader, Writer

__all__ = [
    "WIRE_VERSION",
    "SIGNATURE_BYTES",
    "SHARE_KIND_SELF_MASK",
    "SHARE_KIND_MASK_KEY",
    "AdvertiseKeys",
    "KeyRoster",
    "CoinReveal",
    "RosterCommitment",
    "NeighbourRoster",
    "ProbeRequest",
    "ProbeReport",
    "ContributionReport",
    "ShareKeys",
    "ForwardedShares",
    "MaskedUpload",
    "CkksUpload",
    "ConsistencyRequest",
    "ConsistencySignature",
    "UnmaskRequest",
    "UnmaskResponse",
    "MaskedAggregate",
    "CkksAggregate",
    "Message",
    "MESSAGE_TYPES",
    "decode_message",
    "encode_message",
    "advert_signed_bytes",
    "consistency_signed_bytes",
    "ckks_upload_signed_bytes",
    "masked_upload_signed_bytes",
    "ciphertext_digest",
    "seed_commitment",
    "coin_commitment",
]

WIRE_VERSION = 1
SIGNATURE_BYTES = 64  # Ed25519
KEY_BYTES = 32
DIGEST_BYTES = 32
MAX_PATH = 32  # a roster Merkle audit path: ceil(log2(65535)) = 16 hashes at most; 32 bounds it
SHARE_BYTES = 35  # secfed.crypto.shamir.Share.to_bytes
SHARE_KIND_SELF_MASK = 0  # share of a survivor's self-mask seed
SHARE_KIND_MASK_KEY = 1  # share of a dropout's pairwise-mask X25519 private key

_ADVERT_LABEL = names.LABEL_ADVERT
_CONSISTENCY_LABEL = names.LABEL_CONSISTENCY
_CKKS_UPLOAD_LABEL = names.LABEL_CKKS_UPLOAD
_MASKED_UPLOAD_LABEL = names.LABEL_MASKED_UPLOAD
_SEED_COMMIT_LABEL = names.LABEL_SEED_COMMIT
_COIN_COMMIT_LABEL = names.LABEL_COIN_COMMIT


def _id_list(w: Writer, ids: tuple[str, ...]) -> None:
    w.texts(ids)


def advert_signed_bytes(
    *, spec_digest: bytes, round_number: int, sender: str, cipher_key: bytes, mask_key: bytes,
    coin_commitment: bytes = b"",
) -> bytes:
    """What an enterprise's identity key signs when it advertises its ephemeral keys (and, in
    secagg+, its commitment to its graph coin)."""
    w = Writer().fixed(spec_digest, DIGEST_BYTES).u64(round_number).text(sender)
    return _ADVERT_LABEL + w.blob(cipher_key).blob(mask_key).blob(coin_commitment).getvalue()


def consistency_signed_bytes(*, session_id: bytes, round_number: int, survivors: tuple[str, ...]) -> bytes:
    """What each survivor signs in the consistency check (the survivor set, in spec order)."""
    w = Writer().fixed(session_id, DIGEST_BYTES).u64(round_number)
    _id_list(w, survivors)
    return _CONSISTENCY_LABEL + w.getvalue()


def seed_commitment(*, session_id: bytes, owner: str, seed: bytes) -> bytes:
    """SHA-256 commitment to a 256-bit self-mask seed (hiding: the seed is uniformly random)."""
    w = Writer().fixed(session_id, DIGEST_BYTES).text(owner).fixed(seed, 32)
    return hashlib.sha256(_SEED_COMMIT_LABEL + w.getvalue()).digest()


def coin_commitment(*, spec_digest: bytes, sender: str, coin: bytes) -> bytes:
    """SHA-256 commitment to a 256-bit SecAgg+ graph coin (hiding: the coin is uniformly random;
    binding: SHA-256 collision resistance), tied to the round spec and the sender."""
    w = Writer().fixed(spec_digest, DIGEST_BYTES).text(sender).fixed(coin, COIN_BYTES)
    return hashlib.sha256(_COIN_COMMIT_LABEL + w.getvalue()).digest()


def ciphertext_digest(ciphertexts: tuple[bytes, ...]) -> bytes:
    """SHA-256 over the length-prefixed ciphertext bytes, exactly as uploaded."""
    h = hashlib.sha256(names.LABEL_CKKS_CIPHERTEXTS)
    for ct in ciphertexts:
        h.update(len(ct).to_bytes(8, "big"))
        h.update(ct)
    return h.digest()


def ckks_upload_signed_bytes(
    *, session_id: bytes, round_number: int, sender: str, ledger_head: bytes, ct_digest: bytes
) -> bytes:
    """What an enterprise signs over its CKKS upload (its ledger head and ciphertext digest)."""
    w = Writer().fixed(session_id, DIGEST_BYTES).u64(round_number).text(sender)
    w.blob(ledger_head).fixed(ct_digest, DIGEST_BYTES)
    return _CKKS_UPLOAD_LABEL + w.getvalue()


def masked_upload_signed_bytes(
    *, session_id: bytes, round_number: int, sender: str, ledger_head: bytes, vector: bytes,
    vector_digest: bytes | None = None,
) -> bytes:
    """What an enterprise signs over its masked upload: its ledger head bound to this session,
    round and the SHA-256 of the masked vector (so the head cannot be moved to another upload).
    ``vector_digest``: that SHA-256 when the caller already computed it from ``vector`` (a
    probed round hashes each upload once, for the probe seed too)."""
    digest = hashlib.sha256(vector).digest() if vector_digest is None else vector_digest
    w = Writer().fixed(session_id, DIGEST_BYTES).u64(round_number).text(sender)
    w.blob(ledger_head).fixed(digest, DIGEST_BYTES)
    return _MASKED_UPLOAD_LABEL + w.getvalue()


def _header(type_code: int, round_number: int) -> Writer:
    return Writer().u8(WIRE_VERSION).u8(type_code).u64(round_number)


class _Wire:
    """Mixin: ``to_bytes`` / ``from_bytes`` through the one framing of this module."""

    __slots__ = ()
    TYPE: ClassVar[int]
    round_number: int

    def write(self, w: Writer) -> None:  # pragma: no cover - every message overrides
        raise NotImplementedError

    def to_bytes(self) -> bytes:
        """``version:u8 type:u8 round:u64`` then the message's fields."""
        w = _header(self.TYPE, self.round_number)
        self.write(w)
        return w.getvalue()

    @classmethod
    def from_bytes(cls: type[W], data: bytes) -> W:
        """Parse bytes that must hold exactly this message type.

        Raises:
            MessageFormatError: for any malformed input.
        """
        msg = decode_message(data)
        if not isinstance(msg, cls):
            raise MessageFormatError(
                f"message type must be {cls.__name__} (got {type(msg).__name__})"
            )
        return msg


W = TypeVar("W", bound=_Wire)


@dataclass(frozen=True, slots=True)
class AdvertiseKeys(_Wire):
    """Participant -> coordinator: fresh X25519 keys (share encryption, masks), signed.

    Fields after the header: spec_digest[32], sender, cipher_key blob, mask_key blob,
    coin_commitment blob, signature[64]. In ckks mode both keys are empty (a signed hello);
    ``coin_commitment`` (:func:`coin_commitment`) is 32 bytes in secagg+ and empty otherwise.
    """

    TYPE: ClassVar[int] = 1
    round_number: int
    spec_digest: bytes
    sender: str
    cipher_key: bytes
    mask_key: bytes
    signature: bytes
    coin_commitment: bytes = b""

    def signed_bytes(self) -> bytes:
        return advert_signed_bytes(
            spec_digest=self.spec_digest, round_number=self.round_number, sender=self.sender,
            cipher_key=self.cipher_key, mask_key=self.mask_key, coin_commitment=self.coin_commitment,
        )

    def write(self, w: Writer) -> None:
        w.fixed(self.spec_digest, DIGEST_BYTES).text(self.sender)
        w.blob(self.cipher_key).blob(self.mask_key).blob(self.coin_commitment)
        w.fixed(self.signature, SIGNATURE_BYTES)

    @classmethod
    def read(cls, r: Reader, round_number: int) -> AdvertiseKeys:
        digest, sender = r.fixed(DIGEST_BYTES), r.text()
        cpk, spk, commitment = r.blob(), r.blob(), r.blob()
        for key in (cpk, spk, commitment):
            if len(key) not in (0, KEY_BYTES):
                raise MessageFormatError(f"AdvertiseKeys: key must be 0 or 32 bytes (got {len(key)})")
        return cls(round_number, digest, sender, cpk, spk, r.fixed(SIGNATURE_BYTES), commitment)


@dataclass(frozen=True, slots=True)
class KeyRoster(_Wire):
    """Coordinator -> participants: every advertisement received (spec order), to verify."""

    TYPE: ClassVar[int] = 2
    round_number: int
    adverts: tuple[AdvertiseKeys, ...]

    def write(self, w: Writer) -> None:
        w.u32(len(self.adverts))
        for a in self.adverts:
            if a.round_number != self.round_number:
                raise MessageFormatError("KeyRoster: every advertisement must carry the roster's round")
            a.write(w)

    @classmethod
    def read(cls, r: Reader, round_number: int) -> KeyRoster:
        return cls(round_number, tuple(AdvertiseKeys.read(r, round_number) for _ in range(r.count())))


@dataclass(frozen=True, slots=True)
class CoinReveal(_Wire):
    """Participant -> coordinator (secagg+): its graph coin, sent once it has checked the key
    roster. Fields: session_id[32], sender, coin[32]."""

    TYPE: ClassVar[int] = 13
    round_number: int
    session_id: bytes
    sender: str
    coin: bytes

    def write(self, w: Writer) -> None:
        w.fixed(self.session_id, DIGEST_BYTES).text(self.sender).fixed(self.coin, COIN_BYTES)

    @classmethod
    def read(cls, r: Reader, round_number: int) -> CoinReveal:
        return cls(round_number, r.fixed(DIGEST_BYTES), r.text(), r.fixed(COIN_BYTES))


def _path(w: Writer, path: tuple[bytes, ...]) -> None:
    if len(path) > MAX_PATH:
        raise MessageFormatError(f"roster audit path must hold <= {MAX_PATH} hashes (got {len(path)})")
    w.u8(len(path))
    for h in path:
        w.fixed(h, DIGEST_BYTES)


def _read_path(r: Reader, what: str) -> tuple[bytes, ...]:
    count = r.u8()
    if count > MAX_PATH:
        raise MessageFormatError(f"{what}: audit path must hold <= {MAX_PATH} hashes (got {count})")
    return tuple(r.fixed(DIGEST_BYTES) for _ in range(count))


@dataclass(frozen=True, slots=True)
class RosterCommitment(_Wire):
    """Coordinator -> each key-roster member (secagg+): the committed roster
    (:mod:`secfed.protocol.roster`) instead of every advertisement.

    Fields: members blob (bitmap over the spec's participants, first one in the top bit),
    coin_root[32], advert_root[32], path count:u8 + hashes[32] (the audit path of the
    recipient's own advert). The session id is
    :func:`secfed.protocol.spec.committed_session_id` of these.
    """

    TYPE: ClassVar[int] = 18
    round_number: int
    members: bytes
    coin_root: bytes
    advert_root: bytes
    path: tuple[bytes, ...]

    def write(self, w: Writer) -> None:
        w.blob(self.members).fixed(self.coin_root, DIGEST_BYTES).fixed(self.advert_root, DIGEST_BYTES)
        _path(w, self.path)

    @classmethod
    def read(cls, r: Reader, round_number: int) -> RosterCommitment:
        members, coins, adverts = r.blob(), r.fixed(DIGEST_BYTES), r.fixed(DIGEST_BYTES)
        return cls(round_number, members, coins, adverts, _read_path(r, "RosterCommitment"))


@dataclass(frozen=True, slots=True)
class NeighbourRoster(_Wire):
    """Coordinator -> each key-roster member (secagg+): every member's graph coin (roster
    order), and the signed adverts of the recipient's neighbours, each with its audit path
    into the committed ``advert_root``.

    Fields: session_id[32], coins blob (32 bytes per member), count:u32, then per neighbour
    (spec order): the advert's fields as in :class:`AdvertiseKeys` (after its header), path
    count:u8 + hashes[32].
    """

    TYPE: ClassVar[int] = 19
    round_number: int
    session_id: bytes
    coins: tuple[bytes, ...]
    adverts: tuple[tuple[AdvertiseKeys, tuple[bytes, ...]], ...]

    def write(self, w: Writer) -> None:
        if any(len(c) != COIN_BYTES for c in self.coins):
            raise MessageFormatError(f"NeighbourRoster: every coin must be {COIN_BYTES} bytes")
        w.fixed(self.session_id, DIGEST_BYTES).blob(b"".join(self.coins)).u32(len(self.adverts))
        for a, path in self.adverts:
            if a.round_number != self.round_number:
                raise MessageFormatError("NeighbourRoster: every advertisement must carry the roster's round")
            a.write(w)
            _path(w, path)

    @classmethod
    def read(cls, r: Reader, round_number: int) -> NeighbourRoster:
        sid, raw = r.fixed(DIGEST_BYTES), r.blob()
        if len(raw) % COIN_BYTES:
            raise MessageFormatError(f"NeighbourRoster: coins must be {COIN_BYTES} bytes each (got {len(raw)} bytes)")
        coins = tuple(raw[i:i + COIN_BYTES] for i in range(0, len(raw), COIN_BYTES))
        adverts = tuple(
            (AdvertiseKeys.read(r, round_number), _read_path(r, "NeighbourRoster")) for _ in range(r.count())
        )
        return cls(round_number, sid, coins, adverts)


@dataclass(frozen=True, slots=True)
class ShareKeys(_Wire):
    """Participant -> coordinator: AES-GCM sealed share pairs, one per neighbour, and a hash
    commitment to the self-mask seed (so a wrong share cannot silently corrupt the sum).

    Fields: session_id[32], sender, seed_commitment[32], count:u32, then (receiver, sealed
    blob) pairs.
    """

    TYPE: ClassVar[int] = 3
    round_number: int
    session_id: bytes
    sender: str
    seed_commitment: bytes
    sealed: tuple[tuple[str, bytes], ...]

    def write(self, w: Writer) -> None:
        w.fixed(self.session_id, DIGEST_BYTES).text(self.sender)
        w.fixed(self.seed_commitment, DIGEST_BYTES).u32(len(self.sealed))
        for receiver, blob in self.sealed:
            w.text(receiver).blob(blob)

    @classmethod
    def read(cls, r: Reader, round_number: int) -> ShareKeys:
        sid, sender, commitment = r.fixed(DIGEST_BYTES), r.text(), r.fixed(DIGEST_BYTES)
        items = tuple((r.text(), r.blob()) for _ in range(r.count()))
        return cls(round_number, sid, sender, commitment, items)


@dataclass(frozen=True, slots=True)
class ForwardedShares(_Wire):
    """Coordinator -> one participant: the sealed shares addressed to it, by sender."""

    TYPE: ClassVar[int] = 4
    round_number: int
    session_id: bytes
    receiver: str
    sealed: tuple[tuple[str, bytes], ...]

    def write(self, w: Writer) -> None:
        w.fixed(self.session_id, DIGEST_BYTES).text(self.receiver).u32(len(self.sealed))
        for sender, blob in self.sealed:
            w.text(sender).blob(blob)

    @classmethod
    def read(cls, r: Reader, round_number: int) -> ForwardedShares:
        sid, receiver = r.fixed(DIGEST_BYTES), r.text()
        items = tuple((r.text(), r.blob()) for _ in range(r.count()))
        return cls(round_number, sid, receiver, items)


def _read_vector(r: Reader, ring_bits: int, what: str) -> bytes:
    if ring_bits not in (32, 64):
        raise MessageFormatError(f"{what}: ring_bits must be 32 or 64 (got {ring_bits})")
    vec = r.blob()
    if len(vec) % (ring_bits // 8):
        raise MessageFormatError(f"{what}: vector bytes {len(vec)} not a multiple of {ring_bits // 8}")
    return vec


@dataclass(frozen=True, slots=True)
class MaskedUpload(_Wire):
    """Participant -> coordinator: the masked ring vector (little-endian words), signed.

    Fields: session_id[32], sender, ledger_head blob, ring_bits:u8, vector blob, signature[64]
    over :func:`masked_upload_signed_bytes` (the head bound to the session, round and vector).
    """

    TYPE: ClassVar[int] = 5
    round_number: int
    session_id: bytes
    sender: str
    ledger_head: bytes
    ring_bits: int
    vector: bytes
    signature: bytes

    def signed_bytes(self, vector_digest: bytes | None = None) -> bytes:
        """The signed bytes; ``vector_digest`` = SHA-256 of :attr:`vector` if already known."""
        return masked_upload_signed_bytes(
            session_id=self.session_id, round_number=self.round_number, sender=self.sender,
            ledger_head=self.ledger_head, vector=self.vector, vector_digest=vector_digest,
        )

    def write(self, w: Writer) -> None:
        w.fixed(self.session_id, DIGEST_BYTES).text(self.sender).blob(self.ledger_head)
        w.u8(self.ring_bits).blob(self.vector).fixed(self.signature, SIGNATURE_BYTES)

    @classmethod
    def read(cls, r: Reader, round_number: int) -> MaskedUpload:
        sid, sender, head, bits = r.fixed(DIGEST_BYTES), r.text(), r.blob(), r.u8()
        vector = _read_vector(r, bits, "MaskedUpload")
        return cls(round_number, sid, sender, head, bits, vector, r.fixed(SIGNATURE_BYTES))


@dataclass(frozen=True, slots=True)
class CkksUpload(_Wire):
    """Participant -> coordinator: serialized CKKS ciphertexts plus a signature over them.

    Fields: session_id[32], sender, ledger_head blob, count:u32 + ciphertext blobs, signature[64].
    """

    TYPE: ClassVar[int] = 6
    round_number: int
    session_id: bytes
    sender: str
    ledger_head: bytes
    ciphertexts: tuple[bytes, ...]
    signature: bytes

    def signed_bytes(self) -> bytes:
        return ckks_upload_signed_bytes(
            session_id=self.session_id, round_number=self.round_number, sender=self.sender,
            ledger_head=self.ledger_head, ct_digest=ciphertext_digest(self.ciphertexts),
        )

    def write(self, w: Writer) -> None:
        w.fixed(self.session_id, DIGEST_BYTES).text(self.sender).blob(self.ledger_head)
        w.u32(len(self.ciphertexts))
        for ct in self.ciphertexts:
            w.blob(ct)
        w.fixed(self.signature, SIGNATURE_BYTES)

    @classmethod
    def read(cls, r: Reader, round_number: int) -> CkksUpload:
        sid, sender, head = r.fixed(DIGEST_BYTES), r.text(), r.blob()
        cts = tuple(r.blob() for _ in range(r.count()))
        return cls(round_number, sid, sender, head, cts, r.fixed(SIGNATURE_BYTES))


@dataclass(frozen=True, slots=True)
class ConsistencyRequest(_Wire):
    """Coordinator -> survivors: the set of parties whose masked input is in the sum."""

    TYPE: ClassVar[int] = 7
    round_number: int
    session_id: bytes
    survivors: tuple[str, ...]

    def write(self, w: Writer) -> None:
        w.fixed(self.session_id, DIGEST_BYTES)
        _id_list(w, self.survivors)

    @classmethod
    def read(cls, r: Reader, round_number: int) -> ConsistencyRequest:
        return cls(round_number, r.fixed(DIGEST_BYTES), r.texts())


@dataclass(frozen=True, slots=True)
class ConsistencySignature(_Wire):
    """Survivor -> coordinator: its Ed25519 signature over the survivor set it was shown."""

    TYPE: ClassVar[int] = 8
    round_number: int
    session_id: bytes
    sender: str
    signature: bytes

    def write(self, w: Writer) -> None:
        w.fixed(self.session_id, DIGEST_BYTES).text(self.sender).fixed(self.signature, SIGNATURE_BYTES)

    @classmethod
    def read(cls, r: Reader, round_number: int) -> ConsistencySignature:
        return cls(round_number, r.fixed(DIGEST_BYTES), r.text(), r.fixed(SIGNATURE_BYTES))


@dataclass(frozen=True, slots=True)
class UnmaskRequest(_Wire):
    """Coordinator -> one survivor: the signed survivor set and which shares it asks for.

    ``self_mask_of``: owners whose self-mask seed share is asked (must be survivors);
    ``mask_key_of``: owners whose pairwise-mask key share is asked (must be dropouts).
    """

    TYPE: ClassVar[int] = 9
    round_number: int
    session_id: bytes
    survivors: tuple[str, ...]
    signatures: tuple[tuple[str, bytes], ...]
    self_mask_of: tuple[str, ...]
    mask_key_of: tuple[str, ...]

    def write(self, w: Writer) -> None:
        w.fixed(self.session_id, DIGEST_BYTES)
        _id_list(w, self.survivors)
        w.u32(len(self.signatures))
        for signer, sig in self.signatures:
            w.text(signer).fixed(sig, SIGNATURE_BYTES)
        _id_list(w, self.self_mask_of)
        _id_list(w, self.mask_key_of)

    @classmethod
    def read(cls, r: Reader, round_number: int) -> UnmaskRequest:
        sid, survivors = r.fixed(DIGEST_BYTES), r.texts()
        sigs = tuple((r.text(), r.fixed(SIGNATURE_BYTES)) for _ in range(r.count()))
        return cls(round_number, sid, survivors, sigs, r.texts(), r.texts())


@dataclass(frozen=True, slots=True)
class UnmaskResponse(_Wire):
    """Survivor -> coordinator: (owner, kind, 35-byte Shamir share) triples."""

    TYPE: ClassVar[int] = 10
    round_number: int
    session_id: bytes
    sender: str
    shares: tuple[tuple[str, int, bytes], ...]

    def write(self, w: Writer) -> None:
        w.fixed(self.session_id, DIGEST_BYTES).text(self.sender).u32(len(self.shares))
        for owner, kind, share in self.shares:
            w.text(owner).u8(kind).fixed(share, SHARE_BYTES)

    @classmethod
    def read(cls, r: Reader, round_number: int) -> UnmaskResponse:
        sid, sender = r.fixed(DIGEST_BYTES), r.text()
        items = []
        for _ in range(r.count()):
            owner, kind = r.text(), r.u8()
            if kind not in (SHARE_KIND_SELF_MASK, SHARE_KIND_MASK_KEY):
                raise MessageFormatError(f"UnmaskResponse: share kind must be 0 or 1 (got {kind})")
            items.append((owner, kind, r.fixed(SHARE_BYTES)))
        return cls(round_number, sid, sender, tuple(items))


@dataclass(frozen=True, slots=True)
class MaskedAggregate(_Wire):
    """Coordinator -> participants: the unmasked ring sum and the survivors it contains."""

    TYPE: ClassVar[int] = 11
    round_number: int
    session_id: bytes
    survivors: tuple[str, ...]
    ring_bits: int
    vector: bytes

    def write(self, w: Writer) -> None:
        w.fixed(self.session_id, DIGEST_BYTES)
        _id_list(w, self.survivors)
        w.u8(self.ring_bits).blob(self.vector)

    @classmethod
    def read(cls, r: Reader, round_number: int) -> MaskedAggregate:
        sid, survivors, bits = r.fixed(DIGEST_BYTES), r.texts(), r.u8()
        return cls(round_number, sid, survivors, bits, _read_vector(r, bits, "MaskedAggregate"))


@dataclass(frozen=True, slots=True)
class CkksAggregate(_Wire):
    """Coordinator -> participants: every member's signed upload, for the participant to add.

    ``members`` holds (id, ledger_head, ciphertexts, signature) for each contributor, exactly as
    it uploaded them. A participant recomputes each digest from the ciphertext bytes, checks the
    member's signature over it, and only then parses and adds the ciphertexts itself: the sum is
    tied to the signed uploads, so a coordinator cannot send a multiple of one upload or a
    subset's sum under a larger member list. There is deliberately no field for a sum computed
    by the coordinator: nothing the coordinator adds beyond the signed uploads is read.

    Fields: session_id[32], count:u32, then per member: id, ledger_head blob, count:u32 +
    ciphertext blobs, signature[64].
    """

    TYPE: ClassVar[int] = 12
    round_number: int
    session_id: bytes
    members: tuple[tuple[str, bytes, tuple[bytes, ...], bytes], ...]

    def write(self, w: Writer) -> None:
        w.fixed(self.session_id, DIGEST_BYTES).u32(len(self.members))
        for sender, head, cts, sig in self.members:
            w.text(sender).blob(head).u32(len(cts))
            for ct in cts:
                w.blob(ct)
            w.fixed(sig, SIGNATURE_BYTES)

    @classmethod
    def read(cls, r: Reader, round_number: int) -> CkksAggregate:
        sid = r.fixed(DIGEST_BYTES)
        members = []
        for _ in range(r.count()):
            sender, head = r.text(), r.blob()
            cts = tuple(r.blob() for _ in range(r.count()))
            members.append((sender, head, cts, r.fixed(SIGNATURE_BYTES)))
        return cls(round_number, sid, tuple(members))


def _read_probe_count(r: Reader, what: str) -> int:
    k = r.u16()
    if not 1 <= k <= MAX_PROBES:
        raise MessageFormatError(f"{what}: probes must be in [1, {MAX_PROBES}] (got {k})")
    return k


def _words(w: Writer, values: tuple[int, ...]) -> None:
    for v in values:
        w.u64(v)


@dataclass(frozen=True, slots=True)
class ProbeRequest(_Wire):
    """Coordinator -> uploaders (``spec.probes`` > 0): every masked upload in the sum, as
    (sender, SHA-256 of its vector) in spec order. There is no seed field: each enterprise
    derives the probes itself from these digests (:func:`secfed.protocol.probes.probe_seed`),
    so they exist only once every listed upload does.

    Fields: session_id[32], probes:u16, count:u32, then (sender, digest[32]) pairs.
    """

    TYPE: ClassVar[int] = 15
    round_number: int
    session_id: bytes
    probes: int
    uploads: tuple[tuple[str, bytes], ...]

    def write(self, w: Writer) -> None:
        w.fixed(self.session_id, DIGEST_BYTES).u16(self.probes).u32(len(self.uploads))
        for sender, digest in self.uploads:
            w.text(sender).fixed(digest, DIGEST_BYTES)

    @classmethod
    def read(cls, r: Reader, round_number: int) -> ProbeRequest:
        sid, k = r.fixed(DIGEST_BYTES), _read_probe_count(r, "ProbeRequest")
        uploads = tuple((r.text(), r.fixed(DIGEST_BYTES)) for _ in range(r.count()))
        return cls(round_number, sid, k, uploads)


@dataclass(frozen=True, slots=True)
class ProbeReport(_Wire):
    """Uploader -> coordinator: ``<self mask, v_j>`` and, for every peer whose pairwise mask
    its upload carries, ``<PRG(pair seed), v_j>`` (unsigned: both ends report the same words),
    all mod 2^ring_bits, for j < probes.

    Fields: session_id[32], sender, probes:u16, probes x u64 self terms, count:u32, then
    (peer, probes x u64) pairs.
    """

    TYPE: ClassVar[int] = 16
    round_number: int
    session_id: bytes
    sender: str
    self_terms: tuple[int, ...]
    pair_terms: tuple[tuple[str, tuple[int, ...]], ...]

    def write(self, w: Writer) -> None:
        k = len(self.self_terms)
        if any(len(t) != k for _, t in self.pair_terms):
            raise MessageFormatError("ProbeReport: every pair must carry as many terms as the self mask")
        w.fixed(self.session_id, DIGEST_BYTES).text(self.sender).u16(k)
        _words(w, self.self_terms)
        w.u32(len(self.pair_terms))
        for peer, terms in self.pair_terms:
            w.text(peer)
            _words(w, terms)

    @classmethod
    def read(cls, r: Reader, round_number: int) -> ProbeReport:
        sid, sender = r.fixed(DIGEST_BYTES), r.text()
        k = _read_probe_count(r, "ProbeReport")
        own = tuple(r.u64() for _ in range(k))
        pairs = tuple((r.text(), tuple(r.u64() for _ in range(k))) for _ in range(r.count()))
        return cls(round_number, sid, sender, own, pairs)


@dataclass(frozen=True, slots=True)
class ContributionReport(_Wire):
    """Survivor -> coordinator (stage contribute): ``<PRG(pair seed), U'>`` mod 2^ring_bits for
    each surviving peer whose pairwise mask its upload carries, ``U'`` being the round's sum on
    the grid of :func:`secfed.protocol.probes.contribution_vector`.

    Fields: session_id[32], sender, count:u32, then (peer, u64) pairs.
    """

    TYPE: ClassVar[int] = 17
    round_number: int
    session_id: bytes
    sender: str
    pair_terms: tuple[tuple[str, int], ...]

    def write(self, w: Writer) -> None:
        w.fixed(self.session_id, DIGEST_BYTES).text(self.sender).u32(len(self.pair_terms))
        for peer, term in self.pair_terms:
            w.text(peer).u64(term)

    @classmethod
    def read(cls, r: Reader, round_number: int) -> ContributionReport:
        sid, sender = r.fixed(DIGEST_BYTES), r.text()
        return cls(round_number, sid, sender, tuple((r.text(), r.u64()) for _ in range(r.count())))


Message = Union[  # noqa: UP007 - a runtime alias, kept readable
    AdvertiseKeys, KeyRoster, ShareKeys, ForwardedShares, MaskedUpload, CkksUpload,
    ConsistencyRequest, ConsistencySignature, UnmaskRequest, UnmaskResponse,
    MaskedAggregate, CkksAggregate, CoinReveal, ProbeRequest, ProbeReport,
    ContributionReport, RosterCommitment, NeighbourRoster,
]
MESSAGE_TYPES: dict[int, type[Message]] = {
    cls.TYPE: cls
    for cls in (
        AdvertiseKeys, KeyRoster, ShareKeys, ForwardedShares, MaskedUpload, CkksUpload,
        ConsistencyRequest, ConsistencySignature, UnmaskRequest, UnmaskResponse,
        MaskedAggregate, CkksAggregate, CoinReveal, ProbeRequest, ProbeReport,
        ContributionReport, RosterCommitment, NeighbourRoster,
    )
}

def encode_message(message: Message) -> bytes:
    """The versioned wire form of ``message``."""
    return message.to_bytes()


def decode_message(data: bytes) -> Message:
    """Parse one message of any type.

    Raises:
        MessageFormatError: for any malformed input (version, type, lengths, trailing bytes).
    """
    r = Reader(data, "message")
    version = r.u8()
    if version != WIRE_VERSION:
        raise MessageFormatError(f"message version must be {WIRE_VERSION} (got {version})")
    code = r.u8()
    cls = MESSAGE_TYPES.get(code)
    if cls is None:
        raise MessageFormatError(f"message type must be one of {sorted(MESSAGE_TYPES)} (got {code})")
    round_number = r.u64()
    msg = cls.read(r, round_number)
    r.end()
    return msg
