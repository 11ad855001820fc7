"""Unit tests: ids, validation and the on-disk codec."""

from __future__ import annotations

import random
import time
import uuid

import pytest

from zeroloss.errors import MalformedMessageError, MessageError
from zeroloss.message import ID_HEADER, Message, decode, encode, id_time, new_message, uuid7, validate_topic


def test_uuid7_is_version_7_strictly_increasing_and_time_ordered() -> None:
    ids = [uuid7() for _ in range(20000)]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    u = uuid.UUID(ids[0])
    assert u.version == 7 and u.variant == uuid.RFC_4122
    assert abs(id_time(ids[-1]) - time.time()) < 5


def test_new_message_validates_every_field_with_a_clear_reason() -> None:
    with pytest.raises(MessageError, match="value of type object cannot be sent as JSON"):
        new_message("t", object())
    with pytest.raises(MessageError, match="value is None"):
        new_message("t", None)
    with pytest.raises(MessageError, match="key must be bytes or str"):
        new_message("t", b"v", key=5)  # type: ignore[arg-type]
    with pytest.raises(MessageError, match="invalid topic name"):
        new_message("bad topic!", b"v")
    with pytest.raises(MessageError, match="topic must be a str"):
        new_message(None, b"v")  # type: ignore[arg-type]
    with pytest.raises(MessageError, match="reserved"):
        new_message("t", b"v", headers={ID_HEADER: b"x"})
    with pytest.raises(MessageError, match="exceeds the limit of 10 bytes"):
        new_message("t", b"x" * 11, max_bytes=10)
    for bad in ("", ".", "..", "x" * 250):
        with pytest.raises(MessageError):
            validate_topic(bad)
    assert validate_topic("a.b_c-1") == "a.b_c-1"


def test_codec_round_trips_every_field() -> None:
    m = Message(
        id=uuid7(), topic="orders", value=bytes(range(256)), key=b"\x00\xff",
        headers=(("a", b"\x00"), ("a", b"second"), ("b", b"")), created_at=1.5,
        attempts=3, not_before=2.25, last_error="boom ünïcode",
    )  # fmt: skip
    assert decode(encode(m)) == m
    no_key = new_message("t", b"")
    assert decode(encode(no_key)) == no_key


@pytest.mark.parametrize("cut", [0, 3, 10, 14, 30, -1])
def test_truncated_bytes_are_detected(cut: int) -> None:
    data = encode(new_message("t", b"value" * 20, key=b"k"))
    with pytest.raises(MalformedMessageError, match="truncated"):
        decode(data[:cut])


def test_every_single_bit_flip_in_the_body_is_detected() -> None:
    data = bytearray(encode(new_message("t", b"value", key=b"k", headers={"h": b"1"})))
    rng = random.Random(7)
    for pos in rng.sample(range(len(data)), 60):
        flipped = bytearray(data)
        flipped[pos] ^= 1 << rng.randrange(8)
        with pytest.raises(MalformedMessageError):
            decode(bytes(flipped))


def test_foreign_and_future_files_are_refused() -> None:
    with pytest.raises(MalformedMessageError, match="magic"):
        decode(b"PK\x03\x04" + b"\x00" * 40)
    data = bytearray(encode(new_message("t", b"v")))
    data[3] = 99
    with pytest.raises(MalformedMessageError, match="version 99"):
        decode(bytes(data))
