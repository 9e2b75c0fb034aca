"""The shared vocabulary of secfed: modes, stages, protections, trainable sets, domain labels.

A leaf module (standard library and numpy only, no torch, no other secfed import), so every
layer -- ``secfed.crypto`` and ``secfed.protocol`` included -- may import it
(``tools/check_layers.py`` lists it as free). Adding a mode or a stage starts here; the tables
derived below (wire codes, the stages each mode runs, CLI choices) follow from the enums, and
``tests/test_names.py`` fails if one of them is left behind.

The enums are :class:`enum.StrEnum`: a member equals its string (``Mode.CKKS == "ckks"``), so
the many places that carry plain strings (JSON, SQLite rows, pydantic fields) keep working.
Tuples of *values* (``MODES``, ``PROTECTIONS``, ...) hold plain ``str`` so messages that print
them read as before.
"""

from __future__ import annotations

import enum
import hashlib

import numpy as np

__all__ = [
    "Mode",
    "MODES",
    "MASK_MODES",
    "Stage",
    "MESSAGE_STAGES",
    "STAGES_OF",
    "PROBE_ONLY_STAGES",
    "WIRE_STAGES",
    "Protection",
    "PROTECTIONS",
    "UPDATE_PROTECTIONS",
    "protection_of",
    "TrainableSet",
    "TRAINABLE_SCOPES",
    "FEATURE_SCOPES",
    "ADVERSARIES",
    "MIN_THRESHOLD",
    "default_threshold",
    "CKKS_SLOTS",
    "vector_hash",
    "KEY_LABELS",
    "DOMAIN_LABELS",
]


class Mode(enum.StrEnum):
    """How a round protects the updates. The order is the RoundSpec wire code: append only."""

    SECAGG = "secagg"  # pairwise masks, every party shares with every other (Bonawitz et al.)
    SECAGG_PLUS = "secagg+"  # masks over a sparse random graph (Bell et al.)
    CKKS = "ckks"  # threshold-free CKKS encryption under a key the sites share

    @property
    def masks(self) -> bool:
        """Whether updates are masked integer vectors (a distributed-DP noise hook can act)."""
        return self is not Mode.CKKS


MODES: tuple[str, ...] = tuple(m.value for m in Mode)
MASK_MODES: tuple[str, ...] = tuple(m.value for m in Mode if m.masks)


class Stage(enum.StrEnum):
    """Stages of a round, in order. The coordinator collects the messages of its current stage."""

    ADVERTISE = "advertise"  # signed ephemeral X25519 keys (ckks: a signed hello)
    REVEAL = "reveal"  # secagg+ only: each party's graph coin, committed to in its advert
    SHARE = "share"  # encrypted Shamir shares of the self-mask seed and the mask key
    UPLOAD = "upload"  # masked vector (ckks: signed ciphertexts)
    PROBE = "probe"  # spec.probes > 0: mask terms of the norm probes, fixed by every upload
    CONSISTENCY = "consistency"  # each survivor signs the survivor set
    UNMASK = "unmask"  # shares of survivors' seeds / dropouts' keys, never both
    CONTRIBUTE = "contribute"  # spec.probes > 0: pair-mask terms of <mask, aggregate>
    DONE = "done"
    ABORTED = "aborted"


#: Stages in which a participant sends a message, in round order.
MESSAGE_STAGES: tuple[Stage, ...] = tuple(s for s in Stage if s not in (Stage.DONE, Stage.ABORTED))

#: Message stages that exist only in probed rounds (``RoundSpec.probes`` > 0, mask modes).
PROBE_ONLY_STAGES: tuple[Stage, ...] = (Stage.PROBE, Stage.CONTRIBUTE)

#: The message stages each mode runs without probes, in round order (probed rounds add
#: PROBE after UPLOAD and CONTRIBUTE after UNMASK).
STAGES_OF: dict[Mode, tuple[Stage, ...]] = {
    Mode.SECAGG: (Stage.ADVERTISE, Stage.SHARE, Stage.UPLOAD, Stage.CONSISTENCY, Stage.UNMASK),
    Mode.SECAGG_PLUS: tuple(s for s in MESSAGE_STAGES if s not in PROBE_ONLY_STAGES),
    Mode.CKKS: (Stage.ADVERTISE, Stage.UPLOAD),
}

#: Envelope stage codes (``secfed.transport.api``): a stage's index here is its code on the
#: wire. New stages are APPENDED so existing codes keep their meaning ("reveal" is code 6).
#: Every stage but ``aborted`` (nobody posts to an aborted round) has one.
WIRE_STAGES: tuple[Stage, ...] = (
    Stage.ADVERTISE, Stage.SHARE, Stage.UPLOAD, Stage.CONSISTENCY, Stage.UNMASK, Stage.DONE,
    Stage.REVEAL, Stage.PROBE, Stage.CONTRIBUTE,
)


class Protection(enum.StrEnum):
    """What protects a message's content on the wire (the transcript's ``protection`` column)."""

    MASKED = "masked"  # a masked integer vector
    ENCRYPTED = "encrypted"  # AES-GCM sealed or CKKS ciphertexts
    SIGNED = "signed"  # public values signed with the identity key
    CONTROL = "control"  # public by design (graph coins once revealed, unmask shares)


PROTECTIONS: tuple[str, ...] = tuple(p.value for p in Protection)
#: The protections an update (an upload) may travel under.
UPDATE_PROTECTIONS: tuple[str, ...] = (Protection.MASKED.value, Protection.ENCRYPTED.value)


def protection_of(stage: Stage, mode: str) -> Protection:
    """What protects a participant's ``stage`` message in ``mode`` (recorded in its transcript)."""
    if stage is Stage.ADVERTISE:
        return Protection.SIGNED  # public keys signed with the identity key
    if stage is Stage.REVEAL:
        return Protection.CONTROL  # secagg+ graph coin: public once revealed, bound by the advert
    if stage is Stage.SHARE:
        return Protection.ENCRYPTED  # AES-GCM sealed Shamir shares
    if stage is Stage.UPLOAD:
        return Protection.ENCRYPTED if mode == Mode.CKKS else Protection.MASKED
    if stage is Stage.CONSISTENCY:
        return Protection.SIGNED
    return Protection.CONTROL  # unmask shares: released by design for the survivors / dropouts


class TrainableSet(enum.StrEnum):
    """What sites train and the federation aggregates, largest first."""

    ADAPTER = "adapter"  # LoRA on both towers + the fusion head
    TOP = "top"  # the head + the last layer's LoRA
    HEAD = "head"  # the fusion head (towers frozen: sites train on tower features)
    CLASSIFIER = "classifier"  # the head's MLP

    @property
    def frozen_towers(self) -> bool:
        """Whether the towers stay frozen, so a site trains the head on tower features."""
        return self in (TrainableSet.HEAD, TrainableSet.CLASSIFIER)


TRAINABLE_SCOPES: tuple[str, ...] = tuple(s.value for s in TrainableSet)
FEATURE_SCOPES: tuple[str, ...] = tuple(s.value for s in TrainableSet if s.frozen_towers)

#: Attacks a simulated coordinator can play (``secfed simulate --adversary``).
ADVERSARIES: tuple[str, ...] = (
    "request-both-shares",
    "inconsistent-survivors",
    "substitute-key",
    "below-threshold",
    "replay-previous-round",
)

MIN_THRESHOLD = 2  # t = 1 would let the coordinator unmask a single party's input


def default_threshold(n: int) -> int:
    """t = floor(2n/3), at least 2 and at most n-1, for n share holders.

    A responder releases shares only with ``t`` *other* holders in the survivor set and ``t``
    consistency signatures from others (never counting itself), so ``t + 1 = floor(2n/3) + 1``
    parties must survive: the same survivor quorum as the Bonawitz et al. (2017) default, while
    n = 3 gets t = 2. What it tolerates: ``secfed.protocol.spec.tolerated_colluders`` (about
    n/3 + 1 colluding enterprises with the coordinator; the coordinator alone never, n >= 3).
    """
    return max(MIN_THRESHOLD, min(n - 1, (2 * n) // 3))


#: Values per CKKS ciphertext: N/2 for the N = 8192 ring of ``secfed.crypto.ckks``.
CKKS_SLOTS = 4096


def vector_hash(layout_digest: bytes, vec: np.ndarray) -> str:
    """The adapter hash: hex SHA-256 over a layout digest and the little-endian float32 bytes of
    ``vec`` (what round specs carry as the global hash; docs/CONTRACTS.md)."""
    h = hashlib.sha256(layout_digest)
    h.update(np.ascontiguousarray(vec, dtype="<f4").tobytes())
    return h.hexdigest()


def synthetic_layout_digest(dim: int) -> bytes:
    """The layout digest of a synthetic adapter of ``dim`` values (no model: tests, benches)."""
    return hashlib.sha256(LABEL_SYNTHETIC_LAYOUT + dim.to_bytes(8, "big")).digest()


# Domain-separation labels, ``b"secfed/v1/<purpose>"``: one per use, never reused.
# HKDF info labels (secfed.crypto.keys.derive_key accepts exactly these).
LABEL_PAIRWISE_MASK = b"secfed/v1/pairwise-mask"  # seed of the AES-CTR pairwise mask
LABEL_SHARE_ENCRYPTION = b"secfed/v1/share-encryption"  # AES-GCM key for Shamir shares
LABEL_SELF_MASK = b"secfed/v1/self-mask"  # expansion of a self-mask seed
LABEL_NOISE = b"secfed/v1/noise"  # distributed-DP noise stream (reserved)
LABEL_LEDGER = b"secfed/v1/ledger"  # ledger entry signatures (domain separation)
KEY_LABELS = frozenset(
    {LABEL_PAIRWISE_MASK, LABEL_SHARE_ENCRYPTION, LABEL_SELF_MASK, LABEL_NOISE, LABEL_LEDGER}
)
# crypto
LABEL_AEAD_AD = b"secfed/v1/aead-ad"  # prefix of every AES-GCM associated data
# protocol: signed / hashed messages
LABEL_ADVERT = b"secfed/v1/advertise"
LABEL_CONSISTENCY = b"secfed/v1/consistency"
LABEL_CKKS_UPLOAD = b"secfed/v1/ckks-upload"
LABEL_MASKED_UPLOAD = b"secfed/v1/masked-upload"
LABEL_SEED_COMMIT = b"secfed/v1/self-seed-commitment"
LABEL_COIN_COMMIT = b"secfed/v1/secagg+-coin-commitment"
LABEL_CKKS_CIPHERTEXTS = b"secfed/v1/ckks-ciphertexts"
# protocol: round spec, session id, SecAgg+ graph
LABEL_SPEC = b"secfed/v1/round-spec"
LABEL_SESSION = b"secfed/v1/session"
LABEL_GRAPH = b"secfed/v1/secagg+-graph"
LABEL_GRAPH_SEED = b"secfed/v1/secagg+-graph-coins"
LABEL_PROBES = b"secfed/v1/norm-probes"  # seed of the norm probes (issue 17)
# protocol: the committed SecAgg+ key roster (secfed.protocol.roster)
LABEL_SESSION_ROSTER = b"secfed/v1/session-committed-roster"  # secagg+ session id over roots
LABEL_ROSTER_LEAF = b"secfed/v1/roster-advert-leaf"  # Merkle leaf of one signed advert
LABEL_ROSTER_COINS = b"secfed/v1/roster-coin-commitments"  # hash over every coin commitment
# privacy: ledger entries, receipts, transcripts (the NUL ends the label before the body)
LABEL_LEDGER_ENTRY = b"secfed/v1/ledger-entry\x00"  # SHA-256 domain of an entry's encoding
LABEL_RECEIPT = b"secfed/v1/ledger-receipt\x00"
LABEL_TRANSCRIPT = b"secfed/v1/transcript\x00"
LABEL_TRANSCRIPT_ROUND = b"secfed/v1/transcript-round\x00"
# transport: applied confirmations and enrolment
LABEL_APPLIED = b"secfed/v1/applied-global-hash"
LABEL_REFUSAL = b"secfed/v1/round-refusal"  # a site's signed refusal of a round by its policy
LABEL_ENROL_REQUEST = b"secfed/v1/enrol-request"  # a request's proof of possession of the key
LABEL_KEM_KEY = b"secfed/v1/enrol-ckks-kem-key"  # a site's X25519 key, signed by its identity
LABEL_CKKS_TRANSFER = b"secfed/v1/ckks-secret-transfer"  # HKDF info and AEAD AD of a copy
LABEL_CKKS_COPY = b"secfed/v1/ckks-secret-copy"  # the sender's signature on a sealed copy
LABEL_CKKS_PUBLIC = b"secfed/v1/ckks-public-context"  # the sender's signature on the public ctx
# flower carrier: a site's signed claim of a Flower node id for one run (secfed.flower.wire)
LABEL_FLOWER_ADVERT = b"secfed/v1/flower-node-advert"
# participant: the synthetic stand-in adapter's layout digest
LABEL_SYNTHETIC_LAYOUT = b"secfed/v1/synthetic-layout"

#: Every domain-separation label above (a test checks they are distinct and well-formed).
DOMAIN_LABELS: frozenset[bytes] = frozenset(
    v for k, v in dict(globals()).items() if k.startswith("LABEL_") and isinstance(v, bytes)
)
