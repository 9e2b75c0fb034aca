"""What travels in a Flower Message between the secfed ServerApp workflow and a site's ClientApp.

One Flower message type per step, ``query.secfed_<step>``: the protocol stages of
:data:`secfed.transport.api.STAGES` (whatever the vocabulary holds, new stages included) plus
two transport steps of this carrier, ``identity`` (map a Flower node id to a roster id) and
``outcome`` (the round's signed outcome and receipts, answered with the site's round report).
Each message content is one :class:`ConfigRecord` named ``secfed``; a secfed
:class:`~secfed.transport.api.Envelope` (or a stage input) rides in it as opaque bytes, so
nothing in Flower's transport is trusted for integrity: protocol messages are signed by the
sites' pinned identity keys, and the node-to-roster mapping is a signed advert over a fresh
server nonce and the Flower node id (:func:`advert_signed_bytes`).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any

from secfed import names
from secfed.crypto.keys import IdentityKey, verify_signature
from secfed.errors import InvalidSignature, MessageFormatError, ProtocolError
from secfed.transport.api import STAGES

__all__ = [
    "IDENTITY",
    "OUTCOME",
    "STEPS",
    "PREFIX",
    "RECORD",
    "message_type",
    "step_of",
    "advert_signed_bytes",
    "sign_advert",
    "verify_advert",
    "pack",
    "unpack",
]

IDENTITY = "identity"
OUTCOME = "outcome"
# The protocol's stages (the transport vocabulary, appended stages included) and the carrier's
# own steps. "applied" is the answer to "done", not a step the server sends.
STEPS: tuple[str, ...] = (IDENTITY, *STAGES, OUTCOME)
PREFIX = "secfed_"
RECORD = "secfed"
_ADVERT_LABEL = names.LABEL_FLOWER_ADVERT
NONCE_BYTES = 32


def message_type(step: str) -> str:
    """``query.secfed_<step>``.

    Raises:
        MessageFormatError: ``step`` is not one of :data:`STEPS`.
    """
    if step not in STEPS:
        raise MessageFormatError(f"flower step must be one of {STEPS} (got {step!r})")
    return f"query.{PREFIX}{step}"


def step_of(mtype: str) -> str:
    """The step a message type names (inverse of :func:`message_type`).

    Raises:
        MessageFormatError: not a secfed message type.
    """
    category, _, action = mtype.partition(".")
    step = action[len(PREFIX):] if action.startswith(PREFIX) else ""
    if category != "query" or step not in STEPS:
        raise MessageFormatError(f"message type must be query.{PREFIX}<step> (got {mtype!r})")
    return step


def advert_signed_bytes(*, federation: str, node_id: int, nonce: bytes, enterprise: str) -> bytes:
    """Domain-separated bytes a site signs to claim a Flower node id for one run."""
    fed, eid = federation.encode(), enterprise.encode()
    return (_ADVERT_LABEL + struct.pack(">H", len(fed)) + fed + struct.pack(">Q", node_id)
            + nonce + struct.pack(">H", len(eid)) + eid)


def sign_advert(identity: IdentityKey, *, federation: str, node_id: int, nonce: bytes,
                enterprise: str) -> bytes:
    return identity.sign(advert_signed_bytes(federation=federation, node_id=node_id,
                                             nonce=nonce, enterprise=enterprise))


def verify_advert(roster: Mapping[str, bytes], *, federation: str, node_id: int, nonce: bytes,
                  enterprise: str, signature: bytes) -> None:
    """Raises: ProtocolError (not on the roster), InvalidSignature (not its pinned key)."""
    if enterprise not in roster:
        raise ProtocolError(f"advert enterprise must be on the roster (got {enterprise!r})")
    try:
        verify_signature(roster[enterprise], signature, advert_signed_bytes(
            federation=federation, node_id=node_id, nonce=nonce, enterprise=enterprise))
    except InvalidSignature:
        raise InvalidSignature() from None


def pack(**fields: Any) -> Any:
    """A RecordDict holding ``fields`` (bytes, str, int, float, bool) in the ``secfed`` record."""
    from flwr.app import ConfigRecord, RecordDict

    return RecordDict({RECORD: ConfigRecord({k: v for k, v in fields.items() if v is not None})})


def unpack(content: Any) -> dict[str, Any]:
    """The ``secfed`` record of a message content.

    Raises:
        MessageFormatError: the content has no ``secfed`` config record.
    """
    record = content.config_records.get(RECORD) if content is not None else None
    if record is None:
        raise MessageFormatError(f"flower message must carry a {RECORD!r} config record (missing)")
    return dict(record)


def content_bytes(content: Any) -> int:
    """Bytes of a message content's payload values (arrays, bytes, strings): what a Flower
    message carries, counted the same way for secfed's and Flower's own workflows."""
    total = 0
    for record in content.array_records.values():
        total += sum(len(a.data) for a in record.values())
    for record in content.config_records.values():
        for v in record.values():
            total += _size(v)
    for record in content.metric_records.values():
        for v in record.values():
            total += _size(v)
    return total


def _size(v: Any) -> int:
    if isinstance(v, bytes | str):
        return len(v)
    if isinstance(v, list):
        return sum(_size(x) for x in v)
    return 8
