"""One ``rocketmq://`` URL parser for every RocketMQ part: the credentials of
``rocketmq://AK:SK@HOST:PORT`` reach each client configuration zeroloss builds (publisher, consumer,
dead-letter sender, half messages), several name servers reach the admin, and the secret key
reaches no error message, repr or log line."""

from __future__ import annotations

import hashlib
import hmac
import logging
import socket
from typing import Any

import pytest

from tests import rocketmq_plain
from tests.rocketmq_server import RocketMQServer
from zeroloss.brokers.rocketmq_admin import RocketMQAdmin
from zeroloss.brokers.rocketmq_url import parse_url
from zeroloss.errors import BrokerError, ConfigError

pytest.importorskip("rocketmq", reason="rocketmq-python-client (zeroloss[rocketmq]) not installed")
pytestmark = pytest.mark.filterwarnings("ignore:The 'warn' method is deprecated:DeprecationWarning")

SECRET = "S3cr%2Ft"  # percent-encoded in the URL: the client must get "S3cr/t"
CREDENTIALS = f"rocketmq://AK1:{SECRET}@"


def free_port() -> int:
    with socket.socket() as s:  # a port nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def assert_signed_with_the_urls_credentials(config: Any, endpoint: str) -> None:
    """``config`` (the client's ClientConfiguration) names ``endpoint`` and carries AK1 / S3cr/t;
    the Authorization header the client sends with every request is signed with them."""
    from rocketmq.v5.util.signature import Signature

    assert (config.credentials.ak, config.credentials.sk) == ("AK1", "S3cr/t")
    assert [f"{a.host}:{a.port}" for a in config.rpc_endpoints.endpoints.addresses] == [endpoint]
    headers = dict(Signature.metadata(config, "client-1"))
    expected = hmac.new(b"S3cr/t", headers["x-mq-date-time"].encode(), hashlib.sha1).hexdigest()
    assert headers["authorization"].startswith("MQv2-HMAC-SHA1 Credential=AK1, ")
    assert headers["authorization"].endswith(f"Signature={expected}")


def test_one_parser_reads_proxy_name_servers_cluster_and_credentials() -> None:
    u = parse_url("rocketmq://127.0.0.1:18081?namesrv=127.0.0.1:19876")
    assert (u.endpoint, u.namesrv, u.namesrvs, u.cluster) == (
        "127.0.0.1:18081",
        "127.0.0.1:19876",
        (("127.0.0.1", 19876),),
        None,
    )
    assert (u.access_key, u.secret_key) == ("", "")
    u = parse_url(f"{CREDENTIALS}mq.example")  # RocketMQ's default ports: proxy 8081, name server 9876
    assert (u.endpoint, u.namesrvs, u.access_key, u.secret_key) == (
        "mq.example:8081",
        (("mq.example", 9876),),
        "AK1",
        "S3cr/t",
    )
    u = parse_url("rocketmq://h:1?namesrv=a:1;b:2,c&cluster=C")
    assert (u.namesrvs, u.cluster) == ((("a", 1), ("b", 2), ("c", 9876)), "C")
    assert "S3cr" not in repr(parse_url(f"{CREDENTIALS}h:1"))  # a logged or traced config keeps it


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("kafka://AK1:S3cr%2Ft@h:1", "not a RocketMQ URL"),
        (f"{CREDENTIALS}h:1?queues=3", "unknown setting"),
        (f"{CREDENTIALS}h:1?namesrv=a:b", "HOST:PORT"),
        (f"{CREDENTIALS}h:1?namesrv=;", "names no name server"),
        (f"{CREDENTIALS}:1", "no proxy host"),
        (f"{CREDENTIALS}h:x", "bad port"),
        (f"{CREDENTIALS}h:1/path", "has a path"),
        ("rocketmq://:S3cr%2Ft@h:1", "secret key without an access key"),
    ],
)
def test_a_bad_url_says_what_is_wrong_without_the_secret(url: str, why: str) -> None:
    with pytest.raises(ConfigError, match=why) as bad:
        parse_url(url)
    assert "S3cr" not in str(bad.value) and ":***@" in str(bad.value), str(bad.value)


def test_the_publisher_the_dead_letter_sender_and_half_messages_sign_with_the_urls_credentials() -> None:
    """No server needed: each builds its client configuration before it connects."""
    from zeroloss.brokers.rocketmq import RocketMQBroker
    from zeroloss.brokers.rocketmq_subscription import LetterPublisher
    from zeroloss.half_messages import HalfMessageProducer, Resolution

    url = f"{CREDENTIALS}127.0.0.1:18081?namesrv=127.0.0.1:19876"
    broker = RocketMQBroker(url)
    assert_signed_with_the_urls_credentials(broker.client_config(), "127.0.0.1:18081")
    assert_signed_with_the_urls_credentials(LetterPublisher(url).client_config(), "127.0.0.1:18081")
    half = HalfMessageProducer(url, ["orders"], lambda check: Resolution.COMMIT)
    assert_signed_with_the_urls_credentials(half._client_config, "127.0.0.1:18081")


def test_the_admin_and_the_reader_sign_their_remoting_requests_with_the_urls_credentials() -> None:
    from zeroloss.brokers.rocketmq import RocketMQBroker
    from zeroloss.brokers.rocketmq_reader import RocketMQReader
    from zeroloss.brokers.rocketmq_remoting import signed

    url = f"{CREDENTIALS}127.0.0.1:18081?namesrv=127.0.0.1:19876&cluster=C"
    admin = RocketMQBroker(url).admin()
    assert (admin.credentials, admin.cluster, admin.namesrvs) == (("AK1", "S3cr/t"), "C", (("127.0.0.1", 19876),))
    assert RocketMQReader(url).credentials == ("AK1", "S3cr/t")
    assert RocketMQReader("rocketmq://127.0.0.1:18081").credentials is None  # no credentials: unsigned
    fields = signed({"topic": "t"}, b"", ("AK1", "S3cr/t"))
    assert fields["AccessKey"] == "AK1" and "S3cr" not in str(fields)  # the secret signs, never travels


def test_a_half_message_producer_that_cannot_start_does_not_print_the_secret(caplog: pytest.LogCaptureFixture) -> None:
    from zeroloss.half_messages import HalfMessageProducer, Resolution

    port = free_port()
    caplog.set_level(logging.DEBUG, logger="zeroloss")
    producer = HalfMessageProducer(f"{CREDENTIALS}127.0.0.1:{port}", ["orders"], lambda check: Resolution.COMMIT)
    try:
        producer.start()  # the client may start "successfully" with nothing to talk to
    except BrokerError as exc:
        assert "S3cr" not in str(exc) and "AK1:***@" in str(exc), str(exc)
    finally:
        producer.close()
    assert "S3cr" not in caplog.text


@pytest.mark.rocketmq
def test_the_consumer_and_its_dead_letters_sign_with_the_urls_credentials(
    rocketmq: RocketMQServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The consumer's client is made only on the way to subscribing: on the test server (no ACL:
    the credentials are carried, not checked), with two name servers of which the first is down."""
    from zeroloss.brokers.rocketmq_subscription import RocketMQSubscription

    topic = rocketmq_plain.unique("creds")
    group = rocketmq_plain.prepare(rocketmq, topic)
    caplog.set_level(logging.DEBUG, logger="zeroloss")
    url = f"{CREDENTIALS}{rocketmq.endpoint}?namesrv=127.0.0.1:{free_port()};{rocketmq.namesrv_addr}"
    sub = RocketMQSubscription(url, group, [topic], invisible_s=10)
    try:
        assert_signed_with_the_urls_credentials(sub._consumer.client_configuration, rocketmq.endpoint)
        assert_signed_with_the_urls_credentials(sub._letters.client_config(), rocketmq.endpoint)
        assert sub.fetch(1, 1.0) == []
    finally:
        sub.close()
    # Its offsets were checked through the second name server, without a warning that it could not.
    assert "could not check its offsets" not in caplog.text
    assert "S3cr" not in caplog.text


@pytest.mark.rocketmq
def test_the_admin_asks_the_next_name_server_when_one_is_down(rocketmq: RocketMQServer) -> None:
    down = f"127.0.0.1:{free_port()}"
    admin = RocketMQAdmin(f"{down};{rocketmq.namesrv_addr}", timeout_s=5.0)
    assert admin.masters()  # from the second one
    also_down = f"127.0.0.1:{free_port()}"
    with pytest.raises(BrokerError, match=f"RocketMQ at {down} .*; at {also_down} "):  # both tried, both named
        RocketMQAdmin(f"{down};{also_down}", timeout_s=5.0).masters()
