"""The fields of a RocketMQ message as zeroloss writes them (topic name, user properties, message
keys, FIFO message group) and as its subscription and reader read them back (the key, the headers
without RocketMQ's own properties)."""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Sequence

from zeroloss.brokers._batch import KEY_HEADER, text_value
from zeroloss.message import ID_HEADER, Message

TOPIC_PATTERN = re.compile(r"^[%|a-zA-Z0-9_-]+$")
MAX_TOPIC_LENGTH = 127
MAX_GROUP_LENGTH = 63  # the proxy refuses a group of its maxMessageGroupSize (64) or more (measured)
MAX_KEY_LENGTH = 128
# RocketMQ's own properties (MessageConst, 5.x), not the message's headers: the store keeps them
# beside the user's, and the proxy refuses a message that sets one ("property is used by system").
SYSTEM_PROPERTIES = frozenset(
    {
        "KEYS",
        "TAGS",
        "WAIT",
        "DELAY",
        "RETRY_TOPIC",
        "REAL_TOPIC",
        "REAL_QID",
        "TRAN_MSG",
        "PGROUP",
        "MIN_OFFSET",
        "MAX_OFFSET",
        "BUYER_ID",
        "ORIGIN_MESSAGE_ID",
        "TRANSFER_FLAG",
        "CORRECTION_FLAG",
        "MQ2_FLAG",
        "RECONSUME_TIME",
        "MSG_REGION",
        "TRACE_ON",
        "UNIQ_KEY",
        "EXTEND_UNIQ_INFO",
        "MAX_RECONSUME_TIMES",
        "CONSUME_START_TIME",
        "INNER_NUM",
        "INNER_BASE",
        "DUP_INFO",
        "CHECK_IMMUNITY_TIME_IN_SECONDS",
        "TRAN_PREPARED_QUEUE_OFFSET",
        "TRANSACTION_CHECK_TIMES",
        "INSTANCE_ID",
        "CORRELATION_ID",
        "REPLY_TO_CLIENT",
        "TTL",
        "ARRIVE_TIME",
        "PUSH_REPLY_TIME",
        "CLUSTER",
        "MSG_TYPE",
        "POP_CK",
        "POP_CK_OFFSET",
        "1ST_POP_TIME",
        "PROPERTY_FORWARD_QUEUE_ID",
        "REDIRECT",
        "INNER_MULTI_DISPATCH",
        "INNER_MULTI_QUEUE_OFFSET",
        "TRACE_CONTEXT",
        "BORN_TIMESTAMP",
        "DLQ_ORIGIN_TOPIC",
        "DLQ_ORIGIN_MESSAGE_ID",
        "bname",
    }
)  # and every name starting "__" (__SHARDINGKEY, __BORNHOST, __CRC32#, ...), "TIMER_" or "POP_"


def rocketmq_topic(topic: str) -> str:
    """The RocketMQ topic of a zeroloss topic: the same name, with ``.`` as ``_`` (RocketMQ allows
    only ``[%|a-zA-Z0-9_-]``: ``orders.dlq`` → ``orders_dlq``). ValueError for a name that still
    does not fit."""
    name = topic.replace(".", "_")
    if not TOPIC_PATTERN.match(name) or len(name) > MAX_TOPIC_LENGTH:
        raise ValueError(
            f"topic {topic!r} cannot be a RocketMQ topic: only letters, digits, '_', '-' "
            f"('.' becomes '_'), at most {MAX_TOPIC_LENGTH} characters"
        )
    return name


def _fits(text: str, limit: int) -> str:
    """``text`` if it is at most ``limit`` characters, else a digest of it (same text, same digest)."""
    return text if len(text) <= limit else "sha256:" + hashlib.sha256(text.encode()).hexdigest()[: limit - 7]


def index_key(key: bytes) -> str:
    """A message key for the broker's index: the key as text, base64 where it holds a space (the
    broker splits its keys property at spaces), a digest when long."""
    text = text_value(key)
    if " " in text:
        text = "b64:" + base64.b64encode(key).decode()
    return _fits(text, MAX_KEY_LENGTH)


def message_group(m: Message) -> str:
    """The FIFO message group of ``m``: its key as text (a digest when longer than the proxy
    allows), or its own id when it has no key."""
    return m.id if m.key is None else _fits(text_value(m.key), MAX_GROUP_LENGTH)


def user_properties(m: Message) -> dict[str, str]:
    """The user properties of ``m`` (ValueError for a header RocketMQ cannot carry)."""
    props: dict[str, str] = {}
    for k, v in m.headers:
        if not k or not k.isprintable() or k in (ID_HEADER, KEY_HEADER):
            raise ValueError(f"header name {k!r} cannot be carried as a RocketMQ user property")
        props[k] = text_value(v)
    props[ID_HEADER] = m.id
    if m.key is not None:
        props[KEY_HEADER] = "b64:" + base64.b64encode(m.key).decode()
    return props


def key_text(ours: str | None, keys: Sequence[str], group: str | None, from_zeroloss: bool) -> str | None:
    """The key's text: ``zeroloss-key``; for a foreign message the first message key, else its
    message group (a zeroloss message's keys and group also index its id: not its key)."""
    if ours is not None or from_zeroloss:
        return ours
    return keys[0] if keys else group


def is_system_property(name: str) -> bool:
    """One of RocketMQ's own properties, not a header of the message."""
    return name in SYSTEM_PROPERTIES or name.startswith(("__", "TIMER_", "POP_", "%"))
