"""RocketMQ's remoting protocol (what ``mqadmin`` and the brokers speak, no client library): one
request/response per TCP connection with a JSON header, signed when credentials are given (what
RocketMQ's AclClientRPCHook does), its lenient JSON, the request and answer codes used here, and
the commit-log record format of pulled or queried messages. Used by
:mod:`zeroloss.brokers.rocketmq_admin` and :mod:`zeroloss.brokers.rocketmq_reader`."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import socket
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from zeroloss.errors import BrokerError, ConfigError

DEFAULT_NAMESRV_PORT = 9876


class RequestCode:
    """The remoting protocol's request codes used here (org.apache.rocketmq.remoting.protocol.RequestCode)."""

    PULL_MESSAGE = 11
    QUERY_MESSAGE = 12
    QUERY_CONSUMER_OFFSET = 14
    UPDATE_CONSUMER_OFFSET = 15
    UPDATE_AND_CREATE_TOPIC = 17
    UPDATE_BROKER_CONFIG = 25
    GET_BROKER_CONFIG = 26
    GET_MAX_OFFSET = 30
    GET_MIN_OFFSET = 31
    VIEW_MESSAGE_BY_ID = 33
    GET_ROUTEINFO_BY_TOPIC = 105
    GET_BROKER_CLUSTER_INFO = 106
    UPDATE_AND_CREATE_SUBSCRIPTIONGROUP = 200
    GET_ALL_SUBSCRIPTIONGROUP_CONFIG = 201
    DELETE_SUBSCRIPTIONGROUP = 207
    DELETE_TOPIC_IN_BROKER = 215
    DELETE_TOPIC_IN_NAMESRV = 216
    GET_TOPIC_CONFIG = 351


class ResponseCode:
    """The answers' codes this module tells apart (org.apache.rocketmq.remoting.protocol.ResponseCode)."""

    SUCCESS = 0
    SYSTEM_ERROR = 1
    SYSTEM_BUSY = 2
    TOPIC_NOT_EXIST = 17
    PULL_NOT_FOUND = 19
    PULL_RETRY_IMMEDIATELY = 20
    PULL_OFFSET_MOVED = 21
    QUERY_NOT_FOUND = 22
    SUBSCRIPTION_GROUP_NOT_EXIST = 26


class RemotingError(BrokerError):
    """The broker or name server answered a request with a failure code (``code``, ``remark``).
    Not retriable by default: the same request gets the same answer; SYSTEM_BUSY is."""

    def __init__(self, what: str, code: int, remark: str) -> None:
        super().__init__(f"{what}: code {code}, {remark}", retriable=code == ResponseCode.SYSTEM_BUSY)
        self.code = code
        self.remark = remark


Credentials = tuple[str, str]  # (access key, secret key)


def signed(fields: Mapping[str, str], body: bytes, credentials: Credentials) -> dict[str, str]:
    """``fields`` with the ``AccessKey`` and the ``Signature`` a broker with ACL checks: HMAC-SHA1
    (base64) by the secret key of every field's value in key order, then the body."""
    access_key, secret_key = credentials
    out = {**fields, "AccessKey": access_key}
    content = "".join(v for k, v in sorted(out.items()) if k != "Signature").encode() + body
    out["Signature"] = base64.b64encode(hmac.new(secret_key.encode(), content, hashlib.sha1).digest()).decode()
    return out


def remoting_call(
    address: tuple[str, int],
    code: int,
    fields: Mapping[str, str] | None = None,
    body: bytes = b"",
    timeout: float = 10.0,
    credentials: Credentials | None = None,
) -> tuple[dict[str, Any], bytes]:
    """One request/response of RocketMQ's remoting protocol with a JSON header; OSError when the
    address does not answer.

    A frame is: int32 length of what follows, int32 header length (its top byte the serialization,
    0 = JSON), the header, the body. The answer's header is JSON too; its body is whatever the
    request returns (see :func:`loads` for the JSON in it)."""
    ext = signed(fields or {}, body, credentials) if credentials else dict(fields or {})
    header = json.dumps(
        {"code": code, "language": "PYTHON", "version": 0, "opaque": 1, "flag": 0, "extFields": ext}
    ).encode()
    frame = struct.pack(">ii", 4 + len(header) + len(body), len(header)) + header + body
    with socket.create_connection(address, timeout=timeout) as s:
        s.sendall(frame)

        def read(n: int) -> bytes:
            buf = b""
            while len(buf) < n:
                chunk = s.recv(n - len(buf))
                if not chunk:
                    raise ConnectionError(f"{address[0]}:{address[1]} closed the connection")
                buf += chunk
            return buf

        (length,) = struct.unpack(">i", read(4))
        data = read(length)
    header_length = struct.unpack(">i", data[:4])[0] & 0xFFFFFF
    answer: dict[str, Any] = json.loads(data[4 : 4 + header_length])
    return answer, data[4 + header_length :]


def loads(body: bytes) -> Any:
    """JSON as RocketMQ writes it (fastjson): maps with integer keys come out bare
    (``{"brokerAddrs":{0:"127.0.0.1:10911"}}``), which Python's json refuses; such keys are quoted
    first, outside strings only."""
    text = body.decode("utf-8", "replace")
    out: list[str] = []
    i, n, in_string, expect_key = 0, len(text), False, False
    while i < n:
        c = text[i]
        if in_string:
            out.append(c)
            if c == "\\" and i + 1 < n:
                out.append(text[i + 1])
                i += 1
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string, expect_key = True, False
            out.append(c)
        elif c in "{,":
            expect_key = True
            out.append(c)
        elif expect_key and (c.isdigit() or c == "-"):
            j = i + 1
            while j < n and text[j].isdigit():
                j += 1
            if text[j:].lstrip().startswith(":"):
                out.append(f'"{text[i:j]}"')
            else:
                out.append(text[i:j])
            expect_key = False
            i = j
            continue
        else:
            if not c.isspace():
                expect_key = False
            out.append(c)
        i += 1
    return json.loads("".join(out))


@dataclass(frozen=True)
class StoredMessage:
    """A message as the broker stores it (its commit-log record), as a query or pull returns it."""

    topic: str
    queue_id: int
    queue_offset: int
    physical_offset: int
    store_timestamp_ms: int
    reconsume_times: int
    body: bytes
    properties: dict[str, str]
    broker: str = ""  # the address of the broker that answered with it

    @property
    def message_id(self) -> str | None:
        """The client's message id (UNIQ_KEY), what the gRPC API calls the message id."""
        return self.properties.get("UNIQ_KEY")


MAGIC_V1 = 0xDAA320A7  # MessageDecoder.MESSAGE_MAGIC_CODE (-626843481): topic length in one byte
MAGIC_V2 = 0xDAA320AB  # MESSAGE_MAGIC_CODE_V2 (-626843477): topic length in two bytes
COMPRESSED_FLAG = 0x1
BORN_HOST_V6_FLAG = 0x1 << 4
STORE_HOST_V6_FLAG = 0x1 << 5
NAME_VALUE_SEPARATOR, PROPERTY_SEPARATOR = "\x01", "\x02"


def decode_messages(buf: bytes) -> list[StoredMessage]:
    """Commit-log records back to back (the body of a pull or query answer), as MessageDecoder
    lays them out; ValueError for bytes that are not such records."""
    out: list[StoredMessage] = []
    i = 0
    try:
        while i < len(buf):
            total, magic = struct.unpack_from(">iI", buf, i)
            if magic not in (MAGIC_V1, MAGIC_V2) or total <= 0:
                raise ValueError(f"no message record at byte {i} (magic {magic:#x})")
            p = i + 12  # past total size, magic code, body CRC
            queue_id, _flag, queue_offset, physical, sysflag, _born = struct.unpack_from(">iiqqiq", buf, p)
            p += 36 + (16 if sysflag & BORN_HOST_V6_FLAG else 4) + 4
            (stored,) = struct.unpack_from(">q", buf, p)
            p += 8 + (16 if sysflag & STORE_HOST_V6_FLAG else 4) + 4
            reconsume, _prepared, body_length = struct.unpack_from(">iqi", buf, p)
            p += 16
            body = buf[p : p + body_length]
            p += body_length
            if sysflag & COMPRESSED_FLAG:
                # zlib or gzip (wbits 47 tells them apart); a body compressed otherwise (LZ4, ZSTD) is kept as stored
                with contextlib.suppress(zlib.error):
                    body = zlib.decompress(body, 47)
            if magic == MAGIC_V2:
                (topic_length,) = struct.unpack_from(">h", buf, p)
                p += 2
            else:
                topic_length = buf[p]
                p += 1
            topic = buf[p : p + topic_length].decode()
            p += topic_length
            (props_length,) = struct.unpack_from(">h", buf, p)
            p += 2
            text = buf[p : p + props_length].decode("utf-8", "replace")
            props = dict(
                kv.split(NAME_VALUE_SEPARATOR, 1) for kv in text.split(PROPERTY_SEPARATOR) if NAME_VALUE_SEPARATOR in kv
            )
            out.append(StoredMessage(topic, queue_id, queue_offset, physical, stored, reconsume, body, props))
            i += total
    except (struct.error, IndexError) as exc:
        raise ValueError(f"a truncated or foreign message record at byte {i}: {exc}") from exc
    return out


def parse_address(text: str, default_port: int = DEFAULT_NAMESRV_PORT) -> tuple[str, int]:
    """``host:port`` (or ``host``) → (host, port); ConfigError for anything else."""
    host, sep, port = text.strip().rpartition(":")
    if not sep:
        host, port = text.strip(), str(default_port)
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{text!r} is not HOST:PORT")
    return host, int(port)
