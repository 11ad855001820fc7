"""The RocketMQ pieces that need no server: the one commit-log record decoder the admin and the
reader share (both record versions, compressed bodies), and a topic name RocketMQ cannot have,
refused with a ConfigError before anything is sent."""

from __future__ import annotations

import gzip
import struct
import zlib

import pytest

from zeroloss.brokers.rocketmq_reader import RocketMQReader
from zeroloss.brokers.rocketmq_remoting import COMPRESSED_FLAG, MAGIC_V1, MAGIC_V2, decode_messages
from zeroloss.errors import ConfigError


def record(
    body: bytes,
    *,
    magic: int = MAGIC_V1,
    sysflag: int = 0,
    topic: str = "orders",
    properties: str = "zeroloss-id\x01abc\x02",
) -> bytes:
    """One commit-log record as a broker lays it out (MessageDecoder), IPv4 hosts."""
    topic_field = (struct.pack(">h", len(topic)) if magic == MAGIC_V2 else bytes([len(topic)])) + topic.encode()
    rest = (
        struct.pack(">iiqqiq", 3, 0, 7, 1234, sysflag, 1_000)
        + b"\x7f\x00\x00\x01"
        + struct.pack(">i", 1)
        + struct.pack(">q", 2_000)
        + b"\x7f\x00\x00\x01"
        + struct.pack(">i", 10911)
        + struct.pack(">iqi", 0, 0, len(body))
        + body
        + topic_field
        + struct.pack(">h", len(properties))
        + properties.encode()
    )
    return struct.pack(">iIi", 12 + len(rest), magic, 0) + rest


@pytest.mark.parametrize("magic", [MAGIC_V1, MAGIC_V2], ids=["v1", "v2"])
def test_both_record_versions_decode(magic: int) -> None:
    (m,) = decode_messages(record(b"hello", magic=magic))
    assert (m.topic, m.queue_id, m.queue_offset, m.store_timestamp_ms, m.body) == ("orders", 3, 7, 2_000, b"hello")
    assert m.properties == {"zeroloss-id": "abc"}


def test_zlib_and_gzip_bodies_are_decompressed_and_another_compression_is_kept_as_stored() -> None:
    two = record(zlib.compress(b"zlib body"), sysflag=COMPRESSED_FLAG) + record(
        gzip.compress(b"gzip body"), sysflag=COMPRESSED_FLAG
    )
    assert [m.body for m in decode_messages(two)] == [b"zlib body", b"gzip body"]
    (m,) = decode_messages(record(b"\x04\x22\x4d\x18 lz4-like", sysflag=COMPRESSED_FLAG))
    assert m.body == b"\x04\x22\x4d\x18 lz4-like"


def test_bytes_that_are_no_record_are_a_value_error() -> None:
    with pytest.raises(ValueError, match="no message record at byte 0"):
        decode_messages(b"\x00\x00\x00\x10not a record....")
    with pytest.raises(ValueError, match="truncated"):
        decode_messages(record(b"hello")[:40])


def test_a_topic_rocketmq_cannot_have_is_a_config_error_before_anything_is_sent() -> None:
    # Port 1: nothing listens there, so reaching the name server would fail with another error.
    reader = RocketMQReader("rocketmq://127.0.0.1:1?namesrv=127.0.0.1:1", timeout_s=1)
    with pytest.raises(ConfigError, match="cannot be a RocketMQ topic"):
        list(reader.read("orders with spaces"))
    with pytest.raises(ConfigError, match="cannot be a RocketMQ topic"):
        list(reader.read("x" * 200 + ".dlq"))


def test_a_subscription_to_a_topic_rocketmq_cannot_have_is_a_config_error() -> None:
    pytest.importorskip("rocketmq")
    from zeroloss.brokers.rocketmq_subscription import RocketMQSubscription

    with pytest.raises(ConfigError, match="cannot be a RocketMQ topic"):
        RocketMQSubscription("rocketmq://127.0.0.1:1?namesrv=127.0.0.1:1", "g", ["orders/eu"], timeout_s=1)
