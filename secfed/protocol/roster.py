"""The committed SecAgg+ key roster: a Merkle tree over every signed advertisement.

In ``secagg+`` a party uses the ephemeral keys of its k = O(log n) neighbours only, so it need
not receive (nor verify) the other n - k - 1 adverts. What it must still share with every other
party is *one* roster: the session id commits to all of it, through

* ``advert_root``: the Merkle tree head (RFC 6962 shape: leaf ``H(0x00 || label || leaf
  data)``, node ``H(0x01 || left || right)``) over every signed advertisement in spec order
  (:func:`advert_leaf`: id, pinned identity key, both ephemeral keys, coin commitment,
  signature);
* ``coin_root``: SHA-256 over every coin commitment, in the same order (each party recomputes it
  from the revealed coins, so every coin is still checked against its commitment by everyone);
* the member set (a bitmap over the spec's participants).

A party checks its own advert's inclusion proof before it reveals its coin, and each
neighbour's advert -- signature and inclusion proof -- before it uses that neighbour's keys.
Two parties holding the same session id therefore hold the same roster (collision resistance
of SHA-256), and a coordinator that shows them different rosters shows them different session
ids, which every later signed or sealed message is bound to.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from secfed import names
from secfed.errors import MessageFormatError
from secfed.protocol.messages import AdvertiseKeys, NeighbourRoster, RosterCommitment
from secfed.protocol.spec import RoundSpec, committed_session_id
from secfed.protocol.wire import Writer

__all__ = [
    "HASH_BYTES",
    "advert_leaf",
    "merkle_root",
    "merkle_paths",
    "verify_inclusion",
    "coin_root",
    "members_bitmap",
    "members_from_bitmap",
    "CommittedRoster",
    "commit_roster",
]

HASH_BYTES = 32
_LEAF_LABEL = names.LABEL_ROSTER_LEAF
_COIN_ROOT_LABEL = names.LABEL_ROSTER_COINS


def advert_leaf(
    *, sender: str, identity_key: bytes, cipher_key: bytes, mask_key: bytes, coin_commitment: bytes,
    signature: bytes,
) -> bytes:
    """The leaf hash of one signed advertisement (the spec digest and round are bound by the
    session id itself)."""
    w = Writer().text(sender).blob(identity_key).blob(cipher_key).blob(mask_key)
    w.blob(coin_commitment).blob(signature)
    return hashlib.sha256(b"\x00" + _LEAF_LABEL + w.getvalue()).digest()


def _node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """Largest power of two strictly below ``n`` (n >= 2): RFC 6962's left-subtree size."""
    return 1 << ((n - 1).bit_length() - 1)


def merkle_root(leaves: Sequence[bytes]) -> bytes:
    """RFC 6962 tree head over leaf hashes (at least one)."""
    if not leaves:
        raise MessageFormatError("a roster Merkle tree needs at least one leaf (got 0)")
    if len(leaves) == 1:
        return leaves[0]
    k = _split(len(leaves))
    return _node(merkle_root(leaves[:k]), merkle_root(leaves[k:]))


def merkle_paths(leaves: Sequence[bytes]) -> tuple[bytes, list[tuple[bytes, ...]]]:
    """The tree head and every leaf's audit path (siblings, leaf to root), in O(n log n)."""
    if not leaves:
        raise MessageFormatError("a roster Merkle tree needs at least one leaf (got 0)")
    if len(leaves) == 1:
        return leaves[0], [()]
    k = _split(len(leaves))
    left_root, left = merkle_paths(leaves[:k])
    right_root, right = merkle_paths(leaves[k:])
    paths = [p + (right_root,) for p in left] + [p + (left_root,) for p in right]
    return _node(left_root, right_root), paths


def verify_inclusion(leaf: bytes, index: int, size: int, path: Sequence[bytes], root: bytes) -> bool:
    """Whether ``path`` proves ``leaf`` at ``index`` of a ``size``-leaf tree with head ``root``
    (RFC 9162 section 2.1.3.2). Every hash is checked; a path of the wrong length fails."""
    if not 0 <= index < size:
        return False
    fn, sn, r = index, size - 1, leaf
    for p in path:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = _node(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = _node(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root


def coin_root(commitments: Sequence[bytes]) -> bytes:
    """SHA-256 over the members' coin commitments in roster order (each 32 bytes)."""
    h = hashlib.sha256(_COIN_ROOT_LABEL + len(commitments).to_bytes(4, "big"))
    for c in commitments:
        if len(c) != HASH_BYTES:
            raise MessageFormatError(f"coin commitment must be {HASH_BYTES} bytes (got {len(c)})")
        h.update(c)
    return h.digest()


def members_bitmap(participants: Sequence[str], members: Sequence[str]) -> bytes:
    """Bit i (most significant first) set when ``participants[i]`` is a roster member."""
    chosen = set(members)
    out = bytearray((len(participants) + 7) // 8)
    for i, p in enumerate(participants):
        if p in chosen:
            out[i >> 3] |= 0x80 >> (i & 7)
    return bytes(out)


def members_from_bitmap(participants: Sequence[str], bitmap: bytes) -> tuple[str, ...]:
    """The members (spec order) a bitmap names.

    Raises:
        MessageFormatError: wrong length, or a bit set past the last participant.
    """
    n = len(participants)
    if len(bitmap) != (n + 7) // 8:
        raise MessageFormatError(f"roster bitmap must be {(n + 7) // 8} bytes for {n} participants (got {len(bitmap)})")
    members = tuple(p for i, p in enumerate(participants) if bitmap[i >> 3] & (0x80 >> (i & 7)))
    if n % 8 and bitmap[-1] & (0xFF >> (n % 8)):
        raise MessageFormatError("roster bitmap sets bits past the last participant")
    return members


@dataclass(frozen=True)
class CommittedRoster:
    """The coordinator's side of a committed secagg+ roster: what it sends each member."""

    spec: RoundSpec
    adverts: Mapping[str, AdvertiseKeys]  # spec order
    bitmap: bytes
    coin_root: bytes
    advert_root: bytes
    paths: Mapping[str, tuple[bytes, ...]]
    session_id: bytes

    def commitment_for(self, member: str) -> RosterCommitment:
        """The reveal stage's input for ``member``: the roots and its own advert's path."""
        return RosterCommitment(self.spec.round_number, self.bitmap, self.coin_root, self.advert_root,
                                self.paths[member])

    def neighbours_for(self, member: str, coins: tuple[bytes, ...], neighbours: frozenset[str]) -> NeighbourRoster:
        """The share stage's input for ``member``: every coin, and its neighbours' adverts
        (the members among ``neighbours``, spec order) with their paths."""
        near = [(a, self.paths[p]) for p, a in self.adverts.items() if p in neighbours]
        return NeighbourRoster(self.spec.round_number, self.session_id, coins, tuple(near))


def commit_roster(spec: RoundSpec, adverts: Mapping[str, AdvertiseKeys], identity_keys: Mapping[str, bytes]) -> CommittedRoster:
    """Commit to ``adverts`` (the accepted ones, in spec order): roots, paths, session id."""
    leaves = [
        advert_leaf(sender=p, identity_key=identity_keys[p], cipher_key=a.cipher_key, mask_key=a.mask_key,
                    coin_commitment=a.coin_commitment, signature=a.signature)
        for p, a in adverts.items()
    ]
    root, paths = merkle_paths(leaves)
    bitmap = members_bitmap(spec.participants, list(adverts))
    coins = coin_root([a.coin_commitment for a in adverts.values()])
    sid = committed_session_id(spec, members=bitmap, coin_root=coins, advert_root=root)
    return CommittedRoster(spec, dict(adverts), bitmap, coins, root, dict(zip(adverts, paths)), sid)
