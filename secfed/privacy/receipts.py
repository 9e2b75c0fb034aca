"""Anchors for the privacy ledger: the coordinator's signed receipts and its signed transcript.

A ledger is hash-chained and signed by its own enterprise, which proves who wrote it but not
that it was never rolled back: a site that deletes or restores its ledger file signs a fresh,
consistent chain. Two things outside the site pin it:

* **Receipts.** When the coordinator accepts a ledger head (with an upload, or with the signed
  confirmation that ends a round -- so an entry written after the upload is anchored in the same
  round), it signs a :class:`LedgerReceipt` over ``(federation, round, stage, head, SHA-256 of the
  message it came with, transcript link of the previous round)`` with its own Ed25519 identity
  (pinned in ``federation.toml``). The site keeps every receipt in its ledger file; a rolled-back
  or rewritten ledger no longer matches the receipts it (or the coordinator) holds.
* **The signed transcript.** When a round can no longer change (the next round opens, or the
  federation ends) the coordinator signs a chained link over everything the round recorded
  (:func:`transcript_link`). Receipts carry the previous round's link, so every site's ledger pins
  the coordinator's transcript up to the round before: rewriting or truncating the transcript
  shows against any honest site's receipts, even when the coordinator re-signs it.

Pure functions and one SQL reader of the coordinator's tables (:func:`round_digest`), shared by
the coordinator (signing) and the audit (verifying) so the two can never drift apart.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import struct
from dataclasses import dataclass

from secfed import names
from secfed.crypto.keys import IdentityKey, verify_signature
from secfed.errors import ConfigError, InvalidSignature, MessageFormatError

__all__ = [
    "RECEIPT_STAGES",
    "GENESIS_LINK",
    "LedgerReceipt",
    "receipt_message",
    "sign_receipt",
    "round_digest",
    "transcript_link",
    "transcript_link_message",
]

RECEIPT_MAGIC = b"SFRC"
RECEIPT_VERSION = 1
RECEIPT_STAGES = ("upload", "applied")  # the two moments a site hands the coordinator its head
GENESIS_LINK = bytes(32)  # the "previous link" of round 1
_RECEIPT_LABEL = names.LABEL_RECEIPT
_TRANSCRIPT_LABEL = names.LABEL_TRANSCRIPT
_ROUND_LABEL = names.LABEL_TRANSCRIPT_ROUND
_MAX_HEAD = 4096


def _text(value: str, what: str) -> bytes:
    raw = value.encode("utf-8")
    if not 1 <= len(raw) <= 255:
        raise ConfigError(f"{what} must be 1..255 UTF-8 bytes (got {len(raw)})")
    return struct.pack(">B", len(raw)) + raw


def receipt_message(*, federation: str, round_number: int, stage: str, head: bytes,
                    message_sha256: bytes, previous_link: bytes) -> bytes:
    """The domain-separated bytes the coordinator signs for one accepted ledger head."""
    if stage not in RECEIPT_STAGES:
        raise ConfigError(f"receipt stage must be one of {RECEIPT_STAGES} (got {stage!r})")
    if len(message_sha256) != 32 or len(previous_link) != 32:
        raise ConfigError("receipt digests must be 32 bytes")
    if not 0 < len(head) <= _MAX_HEAD:
        raise ConfigError(f"receipt head must be 1..{_MAX_HEAD} bytes (got {len(head)})")
    return (_RECEIPT_LABEL + _text(federation, "federation") + struct.pack(">Q", round_number)
            + _text(stage, "stage") + struct.pack(">I", len(head)) + bytes(head)
            + bytes(message_sha256) + bytes(previous_link))


@dataclass(frozen=True, slots=True)
class LedgerReceipt:
    """The coordinator's signed statement "I accepted ``head`` in round ``round_number``".

    Wire form: ``b"SFRC" | version u8 | federation (u8 len) | round u64 | stage (u8 len) |
    head (u32 len) | message_sha256[32] | previous_link[32] | signature[64]``.
    """

    federation: str
    round_number: int
    stage: str
    head: bytes
    message_sha256: bytes
    previous_link: bytes
    signature: bytes

    def message(self) -> bytes:
        return receipt_message(federation=self.federation, round_number=self.round_number,
                               stage=self.stage, head=self.head,
                               message_sha256=self.message_sha256,
                               previous_link=self.previous_link)

    def verify(self, coordinator_key: bytes) -> None:
        """Raises :class:`InvalidSignature` unless the coordinator's pinned key signed it."""
        try:
            message = self.message()
        except ConfigError:
            raise InvalidSignature() from None
        verify_signature(coordinator_key, self.signature, message)

    def to_bytes(self) -> bytes:
        return RECEIPT_MAGIC + struct.pack(">B", RECEIPT_VERSION) + self.message()[
            len(_RECEIPT_LABEL):] + self.signature

    @classmethod
    def from_bytes(cls, data: bytes) -> LedgerReceipt:
        """Parse the wire form strictly.

        Raises:
            MessageFormatError: wrong magic, version, lengths or UTF-8.
        """
        data = bytes(data)
        pos = 0

        def take(n: int) -> bytes:
            nonlocal pos
            if n < 0 or pos + n > len(data):
                raise MessageFormatError(f"ledger receipt truncated (need {n} bytes at {pos})")
            out = data[pos:pos + n]
            pos += n
            return out

        if take(4) != RECEIPT_MAGIC:
            raise MessageFormatError("ledger receipt must start with magic b'SFRC'")
        if take(1)[0] != RECEIPT_VERSION:
            raise MessageFormatError(f"ledger receipt version must be {RECEIPT_VERSION}")
        try:
            federation = take(take(1)[0]).decode("utf-8")
            (round_number,) = struct.unpack(">Q", take(8))
            stage = take(take(1)[0]).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MessageFormatError("ledger receipt text must be UTF-8") from exc
        (head_len,) = struct.unpack(">I", take(4))
        if head_len > _MAX_HEAD:
            raise MessageFormatError(f"ledger receipt head must be <= {_MAX_HEAD} bytes")
        head = take(head_len)
        digest, link, signature = take(32), take(32), take(64)
        if pos != len(data):
            raise MessageFormatError(f"ledger receipt has {len(data) - pos} trailing bytes")
        if stage not in RECEIPT_STAGES:
            raise MessageFormatError(f"ledger receipt stage must be one of {RECEIPT_STAGES}")
        return cls(federation, round_number, stage, head, digest, link, signature)


def sign_receipt(identity: IdentityKey, *, federation: str, round_number: int, stage: str,
                 head: bytes, message_sha256: bytes, previous_link: bytes) -> LedgerReceipt:
    """The coordinator's receipt for ``head`` (see :class:`LedgerReceipt`)."""
    message = receipt_message(federation=federation, round_number=round_number, stage=stage,
                              head=head, message_sha256=message_sha256,
                              previous_link=previous_link)
    return LedgerReceipt(federation, round_number, stage, bytes(head), bytes(message_sha256),
                         bytes(previous_link), identity.sign(message))


def _blob(value: object) -> object:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    return value


def round_digest(conn: sqlite3.Connection, round_number: int) -> bytes:
    """SHA-256 over everything the coordinator's state records for one round: the round row
    (spec, status, survivors, hashes, abort reason), every accepted message (stage, sender,
    SHA-256, ledger head, in acceptance order), the signed confirmations and the receipts.

    Timestamps are left out (they are not evidence); the canonical form is sorted-key JSON.

    Raises:
        sqlite3.Error: the database lacks the coordinator's tables.
    """
    row = conn.execute(
        "SELECT round, mode, participants, threshold, status, survivors, global_hash_before,"
        " global_hash_after, spec, abort_reason FROM rounds WHERE round = ?", (round_number,)
    ).fetchone()
    body: dict[str, object] = {
        "round": None if row is None else [_blob(v) for v in row],
        "messages": [[_blob(v) for v in r] for r in conn.execute(
            "SELECT stage, sender, sha256, ledger_head FROM transcript WHERE round = ?"
            " ORDER BY seq", (round_number,))],
        "confirmations": [[_blob(v) for v in r] for r in conn.execute(
            "SELECT sender, global_hash, signature FROM confirmations WHERE round = ?"
            " ORDER BY sender", (round_number,))],
        "receipts": [[_blob(v) for v in r] for r in conn.execute(
            "SELECT sender, stage, receipt FROM receipts WHERE round = ? ORDER BY sender, stage",
            (round_number,))],
    }
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(_ROUND_LABEL + text.encode("ascii")).digest()


def transcript_link_message(*, federation: str, round_number: int, previous_link: bytes,
                            digest: bytes) -> bytes:
    """The bytes the coordinator signs when it closes round ``round_number``'s transcript."""
    return (_TRANSCRIPT_LABEL + _text(federation, "federation") + struct.pack(">Q", round_number)
            + bytes(previous_link) + bytes(digest))


def transcript_link(*, federation: str, round_number: int, previous_link: bytes,
                    digest: bytes) -> bytes:
    """The chain value after round ``round_number``: SHA-256 of its signed message."""
    return hashlib.sha256(transcript_link_message(
        federation=federation, round_number=round_number, previous_link=previous_link,
        digest=digest)).digest()
