"""The upload envelope (network bytes): round-trips, and any byte string either parses or raises
MessageFormatError -- nothing else."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secfed.errors import MessageFormatError
from secfed.transport.api import (
    MAX_LEDGER_HEAD,
    STAGES,
    AppliedConfirmation,
    Envelope,
    ErrorBody,
    applied_signed_bytes,
    error_from_body,
)


@given(
    round_number=st.integers(0, 2**64 - 1),
    stage=st.sampled_from(STAGES),
    head=st.binary(max_size=300),
    payload=st.binary(max_size=2000),
)
def test_envelope_round_trips(round_number, stage, head, payload) -> None:
    env = Envelope(round_number=round_number, stage=stage, ledger_head=head, payload=payload)
    back = Envelope.from_bytes(env.to_bytes())
    assert (back.round_number, back.stage, back.ledger_head, back.payload) == (
        round_number, stage, head, payload)


@settings(max_examples=500)
@given(data=st.binary(max_size=64))
def test_random_bytes_parse_or_raise_format_error(data) -> None:
    try:
        Envelope.from_bytes(b"SFE1\x01" + data)
    except MessageFormatError:
        pass
    try:
        Envelope.from_bytes(data)
    except MessageFormatError:
        pass


def test_envelope_rejections_name_the_field() -> None:
    good = Envelope(round_number=3, stage="upload", ledger_head=b"h", payload=b"p").to_bytes()
    with pytest.raises(MessageFormatError, match="magic"):
        Envelope.from_bytes(b"XXXX" + good[4:])
    with pytest.raises(MessageFormatError, match="version"):
        Envelope.from_bytes(good[:4] + b"\x09" + good[5:])
    with pytest.raises(MessageFormatError, match="stage code"):
        Envelope.from_bytes(good[:13] + b"\x63" + good[14:])
    with pytest.raises(MessageFormatError, match="ledger head length"):
        Envelope.from_bytes(good[:14] + (MAX_LEDGER_HEAD + 1).to_bytes(4, "big") + good[18:])
    with pytest.raises(MessageFormatError, match="must be >="):
        Envelope.from_bytes(good[:10])


def test_applied_confirmation_binding_and_error_mapping() -> None:
    a = applied_signed_bytes(federation="f", round_number=1, global_hash="00" * 32)
    assert a != applied_signed_bytes(federation="f", round_number=2, global_hash="00" * 32)
    assert a != applied_signed_bytes(federation="g", round_number=1, global_hash="00" * 32)
    with pytest.raises(ValueError):
        AppliedConfirmation(global_hash="zz", signature_hex="00" * 64)
    err = error_from_body(400, ErrorBody(error="MessageFormatError", message="x"))
    assert isinstance(err, MessageFormatError)
    # a class name outside the secfed family never gets instantiated from server text
    from secfed.errors import TransportError

    assert isinstance(error_from_body(400, ErrorBody(error="SystemExit", message="x")), TransportError)
