"""The consumer's end-to-end age reads a message's creation time from its UUIDv7 id text, without
building a UUID: the same time as ``id_time``, and the record's timestamp for any other id."""

from __future__ import annotations

import pytest

from zeroloss.consumer.runtime import _created
from zeroloss.message import id_time, uuid7
from zeroloss.received import Received


def _msg(mid: str) -> Received:
    return Received(mid, "t", 0, 0, None, None, (), timestamp_ms=1_234_567)


def test_a_uuid7_id_gives_the_time_in_it() -> None:
    for mid in [uuid7() for _ in range(500)] + [uuid7().upper()]:
        assert _created(_msg(mid)) == id_time(mid)


@pytest.mark.parametrize(
    "mid",
    [
        "3ec88d7f-589b-43bc-a6c3-3d1761a849bf",  # version 4
        "1c4bf9d4557a4d5a916c273dd54fcf6f",  # no hyphens: not our text form
        "topic/0/5",  # a foreign record's position
        "0193a7b2-1111-7222-c333-444455556666",  # variant not RFC 4122
        "0193a7b2-1111-7222-8333-44445555666g",  # not hex
        "0193a7b2-1111+7222-8333-444455556666",  # a hyphen missing
        "-193a7b2-1111-7222-8333-444455556666",  # int() would read a sign (uuid.UUID: 31 digits)
        "x" * 36,
    ],
)
def test_any_other_id_gives_the_record_s_timestamp(mid: str) -> None:
    assert _created(_msg(mid)) == 1_234.567
