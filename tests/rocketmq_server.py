"""A real Apache RocketMQ 5 server for tests and for trying zeroloss out: a name server and one broker
whose gRPC proxy runs inside the broker's JVM ("local" proxy mode), on loopback.

The jars come from Maven Central through ``deploy/rocketmq/pom.xml`` into a cache outside the repo;
the two processes are ``java -cp 'libs/*' org.apache.rocketmq.namesrv.NamesrvStartup`` and
``java -cp 'libs/*' org.apache.rocketmq.proxy.ProxyStartup -pm local -bc broker.conf`` (what
RocketMQ's own ``bin/mqbroker --enable-proxy`` runs), with heaps of 128 and 256 MiB instead of the
4 and 8 GiB of RocketMQ's start scripts.

    python -m tests.rocketmq_server start|stop [--wipe]|status

The broker flushes every message to disk before it answers (``flushDiskType=SYNC_FLUSH``); it is
an ``ASYNC_MASTER``, because there is no slave: it says what it is, so a check of broker role and
replicas (``zeroloss doctor``) can tell that this broker has no copy of the data on a second machine.
(A ``SYNC_MASTER`` without a slave answers sends just the same in 5.5.0 - ``inSyncReplicas`` is 1 by
default, so it waits for no one - measured here: SEND_OK in 17 ms, no SLAVE_NOT_AVAILABLE.)
Topics are not auto-created (``autoCreateTopicEnable=false``): RocketMQ 5 topics carry a message
type (NORMAL, FIFO, DELAY, TRANSACTION) that the client checks against the route before every send
(and the proxy again), so each topic is made on purpose with its type
(:meth:`RocketMQServer.create_topics`); consumer groups must exist too before a gRPC consumer can
receive (the proxy answers "group not found" otherwise), see :meth:`RocketMQServer.create_group`.

Processes are tracked by pid files (``<dir>/<process>/pid``), not by child handles, so another
process (``make rocketmq-stop``, a later pytest run) can reuse or stop them. Settings from the
environment: ``ZEROLOSS_CACHE`` (default ``~/.cache/zeroloss``), ``ZEROLOSS_ROCKETMQ_VERSION``
(5.5.0), ``ZEROLOSS_ROCKETMQ_DIR`` (data and logs, default ``<cache>/rocketmq-server``),
``ZEROLOSS_ROCKETMQ_NAMESRV_PORT`` (19876), ``ZEROLOSS_ROCKETMQ_BROKER_PORT`` (10911; the broker
also listens on that port - 2 and + 1), ``ZEROLOSS_ROCKETMQ_PROXY_PORT`` (gRPC, 18081; the proxy's
remoting port is this - 1), ``ZEROLOSS_ROCKETMQ_JVM_OPTS`` (both JVMs; the per-process heap and JIT
options are added unless it sets -Xmx), ``ZEROLOSS_ROCKETMQ_START_TIMEOUT`` (seconds, 180).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from tests.jvm_service import (
    Jvm,
    ServiceError,
    cache_dir,
    env_int,
    fetch_jars,
    java,
    missing_tools,
    pid_state,
    poll,
    port_open,
    refuse_ephemeral_ports,
    rss_kib,
    stop,
    tail,
)
from zeroloss.brokers.rocketmq_admin import RocketMQAdmin
from zeroloss.brokers.rocketmq_remoting import (  # noqa: F401 - RequestCode, ResponseCode, remoting_call: for tests
    RequestCode,
    ResponseCode,
    remoting_call,
)

T = TypeVar("T")

REPO = Path(__file__).resolve().parent.parent
POM = REPO / "deploy" / "rocketmq" / "pom.xml"
LOGBACK_CONFIG = REPO / "deploy" / "rocketmq" / "logback.xml"
DEFAULT_VERSION = "5.5.0"
CLUSTER = "DefaultCluster"
BROKER_NAME = "broker-a"
CHECK_TOPIC = "zeroloss-rocketmq-check"
CHECK_GROUP = "zeroloss-rocketmq-check"
# One GC thread: the JVMs share 2 cores with the tests. Heaps and the JIT are set per process.
DEFAULT_JVM_OPTS = "-XX:+UseSerialGC -XX:+ExitOnOutOfMemoryError -XX:-OmitStackTraceInFastThrow"
HEAPS = {
    # C1 only where little runs hot: less CPU spent compiling at start.
    "namesrv": "-Xms128m -Xmx128m -XX:TieredStopAtLevel=1",
    # The broker's store and Netty, and the proxy's gRPC server, allocate direct buffers:
    # RocketMQ's scripts give it 15 GiB; 256 MiB is plenty for tests. Full JIT: its timer compares
    # a 38 MiB wheel byte by byte at every flush, about 1 s of CPU each time under C1 only.
    "broker": "-Xms256m -Xmx256m -XX:MaxDirectMemorySize=256m",
    "admin": "-Xmx128m -XX:TieredStopAtLevel=1",
}
MAIN_CLASS = {
    "namesrv": "org.apache.rocketmq.namesrv.NamesrvStartup",
    "broker": "org.apache.rocketmq.proxy.ProxyStartup",
}


def acl_broker_props(credentials: tuple[str, str]) -> dict[str, str]:
    """The broker side of a server that checks credentials (RocketMQ 5's ACL 2.0): the broker keeps
    the users (one super user, ``credentials``, made at start) and refuses remoting requests
    (zeroloss's admin and reader, this module's set-up) not signed by one of them."""
    user, password = credentials
    return {
        "authenticationEnabled": "true",
        "authenticationProvider": "org.apache.rocketmq.auth.authentication.provider.DefaultAuthenticationProvider",
        "innerClientAuthenticationCredentials": json.dumps({"accessKey": user, "secretKey": password}),
        "authenticationMetadataProvider": (
            "org.apache.rocketmq.auth.authentication.provider.LocalAuthenticationMetadataProvider"
        ),
        "initAuthenticationUser": json.dumps({"username": user, "password": password}),
    }


def acl_proxy_props(credentials: tuple[str, str]) -> dict[str, Any]:
    """The proxy side: every gRPC request must be signed by a user the broker keeps (the proxy asks
    the broker for it with ``credentials``, the inner client's)."""
    user, password = credentials
    return {
        "authenticationEnabled": True,
        "authenticationProvider": "org.apache.rocketmq.auth.authentication.provider.DefaultAuthenticationProvider",
        "authenticationMetadataProvider": "org.apache.rocketmq.proxy.auth.ProxyAuthenticationMetadataProvider",
        "innerClientAuthenticationCredentials": json.dumps({"accessKey": user, "secretKey": password}),
    }


class ServerError(ServiceError):
    """The server did not reach the state asked for in time; the message carries the logs' tails."""


def _poll(what: str, deadline: float, check: Callable[[], T | None], interval: float = 0.2) -> T:
    return poll(what, deadline, check, interval, ServerError)


def receive(consumer: Any, max_messages: int = 32, invisible_seconds: int = 15, settle: float = 10.0) -> list[Any]:
    """``consumer.receive`` of rocketmq-python-client's SimpleConsumer, past its start-up race:
    startup() returns before the proxy has the consumer's settings (they go on the telemetry stream),
    and a receive that comes first fails with the proxy's NullPointerException on "settings"; so
    does every receive when the group does not exist (the proxy refused the settings: "group not
    found" shows only in the client's own log). Retried for ``settle`` seconds, then raised."""
    deadline = time.monotonic() + settle
    while True:
        try:
            return list(consumer.receive(max_messages, invisible_seconds))
        except Exception as e:
            if not ("settings" in str(e) and "null" in str(e)) or time.monotonic() >= deadline:
                raise
            time.sleep(0.1)


@dataclass(frozen=True)
class Process(Jvm):
    """One of the two JVMs: ``namesrv`` or ``broker`` (the broker with the gRPC proxy inside)."""

    name: str
    dir: Path
    ports: tuple[int, ...]  # all it listens on; the first is the one clients use
    probe: tuple[int, ...]  # those that "started" waits on (a connect to the HA port logs an ERROR)

    @property
    def config(self) -> Path:
        return self.dir / ("namesrv.properties" if self.name == "namesrv" else "broker.conf")

    @property
    def log(self) -> Path:
        return self.dir / "process.log"

    @property
    def marks(self) -> tuple[bytes, ...]:
        return MAIN_CLASS[self.name].encode(), os.fsencode(self.config)

    def listening(self) -> bool:
        return all(port_open(p) for p in self.probe)

    def closed(self) -> bool:
        return not any(port_open(p) for p in self.probe)


class RocketMQServer:
    """A name server and a broker with its gRPC proxy in local mode, on 127.0.0.1."""

    def __init__(
        self,
        directory: str | os.PathLike[str] | None = None,
        *,
        version: str | None = None,
        namesrv_port: int | None = None,
        broker_port: int | None = None,
        proxy_port: int | None = None,
        jvm_opts: str | None = None,
        broker_props: Mapping[str, str] | None = None,
        proxy_props: Mapping[str, Any] | None = None,
        credentials: tuple[str, str] | None = None,
    ) -> None:
        self.version = version or os.environ.get("ZEROLOSS_ROCKETMQ_VERSION") or DEFAULT_VERSION
        self.dir = Path(directory or os.environ.get("ZEROLOSS_ROCKETMQ_DIR") or cache_dir() / "rocketmq-server")
        self.libs = cache_dir() / f"rocketmq-{self.version}" / "libs"
        self.namesrv_port = namesrv_port or env_int("ZEROLOSS_ROCKETMQ_NAMESRV_PORT", 19876)
        self.broker_port = broker_port or env_int("ZEROLOSS_ROCKETMQ_BROKER_PORT", 10911)
        self.proxy_port = proxy_port or env_int("ZEROLOSS_ROCKETMQ_PROXY_PORT", 18081)
        # The broker's "fast" (VIP) port is listenPort - 2 and its HA port listenPort + 1.
        broker_ports = (
            self.broker_port,
            self.broker_port - 2,
            self.broker_port + 1,
            self.proxy_port,
            self.proxy_remoting_port,
        )
        self.processes = {
            "namesrv": Process("namesrv", self.dir / "namesrv", (self.namesrv_port,), (self.namesrv_port,)),
            "broker": Process("broker", self.dir / "broker", broker_ports, (self.broker_port, self.proxy_port)),
        }
        refuse_ephemeral_ports(
            [p for proc in self.processes.values() for p in proc.ports],
            "ZEROLOSS_ROCKETMQ_NAMESRV_PORT, _BROKER_PORT, _PROXY_PORT",
            ServerError,
        )
        self.jvm_opts = shlex.split(jvm_opts or os.environ.get("ZEROLOSS_ROCKETMQ_JVM_OPTS") or DEFAULT_JVM_OPTS)
        self.credentials = credentials
        self.broker_props = {**(acl_broker_props(credentials) if credentials else {}), **(broker_props or {})}
        self.proxy_props = {**(acl_proxy_props(credentials) if credentials else {}), **(proxy_props or {})}
        self.start_timeout = float(os.environ.get("ZEROLOSS_ROCKETMQ_START_TIMEOUT") or 180)

    # --- addresses ---------------------------------------------------------------------------
    @property
    def proxy_remoting_port(self) -> int:
        return self.proxy_port - 1

    @property
    def namesrv_addr(self) -> str:
        return f"127.0.0.1:{self.namesrv_port}"

    @property
    def broker_addr(self) -> str:
        return f"127.0.0.1:{self.broker_port}"

    @property
    def endpoint(self) -> str:
        """What the gRPC clients (rocketmq-python-client's ClientConfiguration) connect to."""
        return f"127.0.0.1:{self.proxy_port}"

    @property
    def url(self) -> str:
        return f"rocketmq://{self.endpoint}"

    @property
    def zeroloss_url(self) -> str:
        """The target URL for zeroloss: the gRPC proxy, and the name server for its admin work."""
        return f"rocketmq://{self.endpoint}?namesrv={self.namesrv_addr}"

    def _process(self, name: str) -> Process:
        if name not in self.processes:
            raise ValueError(f"processes are {list(self.processes)}, not {name!r}")
        return self.processes[name]

    def missing_tools(self) -> list[str]:
        """What this machine lacks to run the server: java always, mvn only while the jars are not cached."""
        return missing_tools(self._jars_cached())

    # --- jars ----------------------------------------------------------------------------------
    def _jars_cached(self) -> bool:
        return (self.libs / f"rocketmq-proxy-{self.version}.jar").exists()

    def fetch_jars(self) -> None:
        """Copy the name server's, broker's, proxy's and admin tool's jars from Maven into the cache, once."""
        if not self._jars_cached():
            fetch_jars(
                self.libs, POM, f"rocketmq.version={self.version}", f"Apache RocketMQ {self.version}", ServerError
            )

    # --- configuration -------------------------------------------------------------------------
    def _namesrv_properties(self) -> str:
        d = self.processes["namesrv"].dir
        props = {
            "listenPort": str(self.namesrv_port),
            "bindAddress": "127.0.0.1",
            "kvConfigPath": str(d / "kvConfig.json"),
            "configStorePath": str(d / "namesrv.properties"),
        }
        return "".join(f"{k}={v}\n" for k, v in props.items())

    def _broker_properties(self) -> str:
        d = self.processes["broker"].dir
        props = {
            "brokerClusterName": CLUSTER,
            "brokerName": BROKER_NAME,
            "brokerId": "0",
            # One broker, no slave: ASYNC_MASTER says so (a SYNC_MASTER with inSyncReplicas 1, the
            # default, would wait for no slave either). Durability here comes from the flush:
            "brokerRole": "ASYNC_MASTER",
            # a send is answered only once the message is on disk (fsync of the commit log).
            "flushDiskType": "SYNC_FLUSH",
            "namesrvAddr": self.namesrv_addr,
            "brokerIP1": "127.0.0.1",
            "bindAddress": "127.0.0.1",
            "listenPort": str(self.broker_port),
            "haListenPort": str(self.broker_port + 1),
            "storePathRootDir": str(d / "store"),
            "storePathCommitLog": str(d / "store" / "commitlog"),
            # Topics carry a message type in RocketMQ 5: made on purpose (create_topics), never by a typo.
            "autoCreateTopicEnable": "false",
            "autoCreateSubscriptionGroup": "true",
            # Small files instead of 1 GiB commit-log segments and 400 MiB index files (all mmapped).
            "mappedFileSizeCommitLog": str(64 * 1024 * 1024),
            "mappedFileSizeConsumeQueue": str(30_000 * 20),
            "maxHashSlotNum": "50000",
            "maxIndexNum": "200000",
            # The timer (delayed messages) compares its whole 38 MiB wheel byte by byte with the
            # mmapped file and forces it to disk at every flush: once a second by default, 10-18 %
            # of a core with the broker idle (measured here). Every 10 s instead; after a crash the
            # timer goes on from its checkpoint and re-reads its log, so no delayed message is lost.
            "timerFlushIntervalMs": "10000",
            # Transactional (half) messages: the broker asks a producer about a half message left
            # open for transactionTimeOut (6 s by default), scanning every transactionCheckInterval
            # (30 s): a crash test would wait up to 36 s per check-back. 3 s and 2 s here; both are
            # read at each scan, so UPDATE_BROKER_CONFIG changes them at runtime too (after the scan
            # thread's current wait). transactionCheckMax stays 15 (then the broker drops it).
            "transactionTimeOut": "3000",
            "transactionCheckInterval": "2000",
            # 5.5.0's TransactionalOpBatchService spins: its next wake-up is the oldest last-write
            # time of *every* queue's op context (idle ones included) plus transactionOpBatchInterval,
            # already past once a queue has been idle that long, so it wakes again at once - 65 % of
            # a core for as long as the broker runs (measured: 39 s of CPU per idle minute). With an
            # op record written as soon as it is queued (transactionOpMsgMaxSize=1: every commit or
            # rollback is over the size and wakes the service) the interval only bounds the idle
            # wait: 2^31-1 ms. Measured: 3 s of CPU per idle minute. The op records (what settles a
            # half message for the check-back) are written at once instead of up to 3 s later.
            "transactionOpMsgMaxSize": "1",
            "transactionOpBatchInterval": str(2**31 - 1),
        }
        if self.credentials:
            props["authConfigPath"] = str(d / "auth")  # its users (RocksDB), with the rest of the data
        props.update(self.broker_props)
        return "".join(f"{k}={v}\n" for k, v in props.items())

    def _proxy_json(self) -> str:
        config: dict[str, Any] = {
            "rocketMQClusterName": CLUSTER,
            "namesrvAddr": self.namesrv_addr,
            "proxyMode": "local",
            "grpcServerPort": self.proxy_port,
            "remotingListenPort": self.proxy_remoting_port,
            # It would print every thread's stack when a pool is busy: on 2 shared cores, often.
            "enablePrintJstack": False,
            # On SIGTERM the gRPC server waits this long for calls in flight (30 s by default).
            "grpcShutdownTimeSeconds": 3,
            # A receive's long poll lasts what the client asks (its await_duration), not at least 5 s:
            # tests that wait for "nothing more" would otherwise spend 5 s per empty receive.
            "grpcClientConsumerMinLongPollingTimeoutMillis": 100,
        }
        config.update(self.proxy_props)
        return json.dumps(config, indent=2) + "\n"

    def _java(self) -> str:
        return java(ServerError)

    def _jvm(self, role: str, home: Path) -> list[str]:
        """java and its options for ``role`` (namesrv, broker, admin), with ``home`` as user.home:
        RocketMQ puts logs and stray files under ~ (~/logs/rocketmqlogs, ~/store)."""
        heap = [] if any(o.startswith("-Xmx") for o in self.jvm_opts) else shlex.split(HEAPS[role])
        return [
            self._java(),
            *heap,
            *self.jvm_opts,
            "-Djava.awt.headless=true",
            f"-Duser.home={home}",
            f"-Drocketmq.home.dir={self.dir}",
            f"-Drmq.logback.configurationFile={LOGBACK_CONFIG}",
            "-cp",
            f"{self.libs}/*",
        ]

    def _command(self, proc: Process) -> list[str]:
        if proc.name == "namesrv":
            return [*self._jvm("namesrv", proc.dir), MAIN_CLASS["namesrv"], "-c", str(proc.config)]
        return [
            *self._jvm("broker", proc.dir),
            MAIN_CLASS["broker"],
            "-pm",
            "local",
            "-bc",
            str(proc.config),
            "-pc",
            str(proc.dir / "rmq-proxy.json"),
            "-n",
            self.namesrv_addr,
        ]

    def _write_configs(self) -> None:
        for proc in self.processes.values():
            proc.dir.mkdir(parents=True, exist_ok=True)
        self.processes["namesrv"].config.write_text(self._namesrv_properties())
        broker = self.processes["broker"]
        broker.config.write_text(self._broker_properties())
        (broker.dir / "rmq-proxy.json").write_text(self._proxy_json())

    def _launch(self, proc: Process) -> None:
        """Start the JVM detached (its own session, adopted by init), its output to process.log."""
        for port in proc.ports:
            if port_open(port):
                raise ServerError(f"port {port} of the {proc.name} is taken by a process that is not this server's")
        cmd = self._command(proc)
        proc.launch(cmd, proc.log, proc.name)

    # --- admin requests (zeroloss.brokers.rocketmq_admin) --------------------------------------
    @property
    def rocketmq_admin(self) -> RocketMQAdmin:
        """The remoting-protocol admin client on this server's name server (what zeroloss itself uses)."""
        return RocketMQAdmin(self.namesrv_addr, credentials=self.credentials)

    def remoting(
        self, port: int, code: int, fields: Mapping[str, str] | None = None, body: bytes = b"", timeout: float = 10.0
    ) -> tuple[dict[str, Any], bytes]:
        """One request in RocketMQ's own remoting protocol (what mqadmin speaks), JSON headers, to the
        broker's or name server's port: (response header, response body). Milliseconds, where
        mqadmin takes a JVM start and 3-4 s per command."""
        return remoting_call(("127.0.0.1", port), code, fields, body, timeout, self.credentials)

    def create_topics(self, topics: Mapping[str, str], queues: int = 4) -> None:
        """Create or update topics, name -> message type (NORMAL, FIFO, DELAY, TRANSACTION), on the
        broker, and wait until the name server routes each of them (the broker registers at once)."""
        self.rocketmq_admin.create_topics(topics, queues=queues)

    def create_topic(self, topic: str, message_type: str = "NORMAL", queues: int = 4) -> None:
        self.create_topics({topic: message_type}, queues=queues)

    def create_group(self, group: str, *, fifo: bool = False, retry_max_times: int = 16) -> None:
        """Create or update a consumer group: a gRPC consumer cannot join a group that does not exist
        ("group not found"). ``fifo`` sets consumeMessageOrderly, which a FIFO topic's consumers need
        for per-message-group order; after ``retry_max_times`` failed deliveries a message goes to
        ``%DLQ%<group>``."""
        self.rocketmq_admin.create_group(group, fifo=fifo, retry_max_times=retry_max_times)

    def broker_registered(self) -> bool:
        """Whether the name server lists this broker in the cluster (GET_BROKER_CLUSTER_INFO)."""
        return self.rocketmq_admin.broker_registered(self.broker_addr)

    def _register(self) -> bool | None:
        """Have the broker register with the name server now, True once the name server lists it.

        A broker's first registration, at start, goes to the name servers its client has found
        reachable - a list that a scan fills a few milliseconds later (seen here every time), so the
        broker is unknown until the periodic registration 10 s on. Setting brokerPermission (to its
        default, 6 = read and write) makes the broker register at once."""
        if self.broker_registered():
            return True
        self.rocketmq_admin.update_broker_config({"brokerPermission": "6"}, self.broker_addr)
        return True if self.broker_registered() else None

    def routed(self, topic: str) -> bool:
        """Whether the name server has a route for ``topic`` (False while it has none)."""
        return self.rocketmq_admin.routed(topic)

    def broker_config(self) -> dict[str, str]:
        """The running broker's configuration as it reports it (what mqadmin getBrokerConfig prints)."""
        return self.rocketmq_admin.broker_config(self.broker_addr)

    def admin(self, *args: str, timeout: float = 60.0) -> str:
        """Run ``mqadmin ARGS -n <name server>`` (org.apache.rocketmq.tools.command.MQAdminStartup)
        and return what it printed; ServerError if it reports a failure (it exits 0 either way).

        A JVM per call: about 1 s of CPU and 3-4 s of wall time (its Netty client lingers on exit)."""
        home = self.dir / "admin"
        home.mkdir(parents=True, exist_ok=True)
        jvm = self._jvm("admin", home)
        cmd = [
            *jvm[:-2],
            "-Dzeroloss.rocketmq.log.level=ERROR",
            "-Dzeroloss.rocketmq.log.target=System.err",
            *jvm[-2:],
            "org.apache.rocketmq.tools.command.MQAdminStartup",
            *args,
            "-n",
            self.namesrv_addr,
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, cwd=home)
        out = done.stdout + done.stderr
        if done.returncode != 0 or "Exception" in out or out.startswith("usage: mqadmin"):
            raise ServerError(f"mqadmin {shlex.join(args)} failed ({done.returncode}):\n{out[-3000:]}")
        return done.stdout

    # --- the gRPC path, through the Python client ------------------------------------------------
    def client_config(self, request_timeout: float = 10) -> Any:
        from rocketmq import ClientConfiguration, Credentials

        return ClientConfiguration(
            self.endpoint, Credentials(*(self.credentials or ())), request_timeout=request_timeout
        )

    def _round_trip(self, deadline: float) -> bool:
        """Send one message to CHECK_TOPIC through the gRPC proxy and receive and ack it."""
        from rocketmq import FilterExpression, Message, Producer, SimpleConsumer

        body = uuid.uuid4().hex.encode()
        producer = Producer(self.client_config(), (CHECK_TOPIC,))
        producer.startup()
        try:
            msg = Message()
            msg.topic = CHECK_TOPIC
            msg.body = body
            producer.send(msg)
        finally:
            producer.shutdown()
        consumer = SimpleConsumer(
            self.client_config(), CHECK_GROUP, {CHECK_TOPIC: FilterExpression()}, await_duration=2
        )
        consumer.startup()
        try:
            while time.monotonic() < deadline:
                for m in receive(consumer, 32, 15):
                    consumer.ack(m)
                    if m.body == body:
                        return True
        finally:
            consumer.shutdown()
        raise ServerError("the check message sent through the gRPC proxy was never received")

    # --- lifecycle -------------------------------------------------------------------------------
    def running(self) -> dict[str, int | None]:
        """Process name -> pid of its JVM, None for one that is not running."""
        return {name: p.pid() for name, p in self.processes.items()}

    def answering(self) -> bool:
        """Both JVMs running from this directory and every port listening (cheap: no admin call)."""
        return all(self.running().values()) and all(p.listening() for p in self.processes.values())

    def start(self) -> bool:
        """Bring the server up; False if it was already answering (nothing started).

        A process that is down (killed by a test, say) is started on its old data."""
        if self.answering():
            return False
        deadline = time.monotonic() + self.start_timeout
        down = [p for p in self.processes.values() if p.pid() is None]
        for proc in down:  # before anything starts, so a clash leaves nothing to clean up
            for port in proc.ports:
                if port_open(port):
                    raise ServerError(
                        f"port {port} of the {proc.name} is taken by a process that is not this "
                        f"server's (another ZEROLOSS_CACHE / ZEROLOSS_ROCKETMQ_DIR?)"
                    )
        self.fetch_jars()
        if down:
            self._write_configs()
        try:
            for proc in down:  # the name server first: the broker registers with it at start
                self._launch(proc)
                self._wait_listening(proc, deadline)
            self._wait_ready(deadline)
        except BaseException as e:
            logs = self.log_tails()
            self._stop(down)  # leave no half-started JVM behind
            if isinstance(e, ServerError):
                raise ServerError(f"{e}\n{logs}") from None
            raise
        return True

    def _wait_listening(self, proc: Process, deadline: float) -> None:
        def up() -> bool | None:
            if proc.pid() is None:  # a JVM that died will not come back: fail now, not at the deadline
                raise ServerError(f"the {proc.name} exited during start-up")
            return True if proc.listening() else None

        _poll(f"the {proc.name}'s ports {list(proc.ports)}", deadline, up, interval=0.1)

    def _wait_ready(self, deadline: float) -> None:
        """A topic and a group made on the broker and routed by the name server, and a message sent,
        received and acked through the gRPC proxy."""

        def alive(check: Callable[[], T | None]) -> Callable[[], T | None]:
            def guarded() -> T | None:
                for proc in self.processes.values():
                    if proc.pid() is None:
                        raise ServerError(f"the {proc.name} exited during start-up")
                return check()

            return guarded

        def check_topic_and_group() -> bool:
            self.create_topics({CHECK_TOPIC: "NORMAL"}, queues=1)
            self.create_group(CHECK_GROUP)
            return True

        _poll("the broker to register with the name server", deadline, alive(self._register), interval=0.2)
        _poll(
            "creating the check topic and group (and a route to it)",
            deadline,
            alive(check_topic_and_group),
            interval=0.5,
        )
        _poll(
            "a send and receive through the gRPC proxy",
            deadline,
            alive(lambda: self._round_trip(deadline)),
            interval=0.5,
        )

    def stop(self, wipe: bool = False, timeout: float = 30.0) -> list[str]:
        """Stop both JVMs (SIGTERM, then SIGKILL after ``timeout``), the broker first; ``wipe``
        deletes data and logs. Returns the names of those that were running."""
        stopped = self._stop([self.processes["broker"]], timeout)
        stopped += self._stop([self.processes["namesrv"]], timeout)
        if wipe:
            shutil.rmtree(self.dir, ignore_errors=True)
        return stopped

    def _stop(self, procs: Iterable[Process], timeout: float = 30.0) -> list[str]:
        return stop({p.name: p for p in procs}, timeout, ServerError)

    # --- faults ------------------------------------------------------------------------------------
    def pid(self, name: str = "broker") -> int:
        pid = self._process(name).pid()
        if pid is None:
            raise ServerError(f"the {name} is not running")
        return pid

    def kill(self, name: str = "broker", sig: int = signal.SIGKILL, timeout: float = 30.0) -> None:
        """Send ``sig`` to the broker (or the name server); for SIGKILL and SIGTERM, return once the
        JVM is gone and its ports are closed."""
        proc = self._process(name)
        os.kill(self.pid(name), sig)
        if sig in (signal.SIGKILL, signal.SIGTERM):
            _poll(
                f"the {name} to exit",
                time.monotonic() + timeout,
                lambda: True if proc.pid() is None and proc.closed() else None,
                interval=0.05,
            )
            proc.pid_file.unlink(missing_ok=True)

    def pause(self, name: str = "broker") -> None:
        """SIGSTOP: the JVM keeps its sockets open but answers nothing (a hung broker)."""
        os.kill(self.pid(name), signal.SIGSTOP)

    def resume(self, name: str = "broker") -> None:
        os.kill(self.pid(name), signal.SIGCONT)

    def restart(self, name: str = "broker", timeout: float = 120.0) -> None:
        """Start a stopped process again on its data; wait until a message goes through again."""
        proc = self._process(name)
        if proc.pid() is not None:
            raise ServerError(f"the {name} is still running; kill it first")
        deadline = time.monotonic() + timeout
        try:
            self._launch(proc)
            self._wait_listening(proc, deadline)
            # Either process restarted: the name server must list the broker again (a new name
            # server knows nothing; a killed broker's old entry lasts 2 minutes, so check anew).
            _poll("the broker to register with the name server", deadline, self._register, interval=0.2)
            _poll(
                "a send and receive through the gRPC proxy", deadline, lambda: self._round_trip(deadline), interval=0.5
            )
        except ServerError as e:
            raise ServerError(f"{e}\n{self.log_tails([name])}") from None

    # --- reporting -------------------------------------------------------------------------------
    def log_tails(self, names: Iterable[str] | None = None, lines: int = 25) -> str:
        chosen = list(names) if names is not None else list(self.processes)
        return "\n".join(
            f"--- {n}: tail of {self.processes[n].log}\n{tail(self.processes[n].log, lines)}" for n in chosen
        )

    def rss_kib(self) -> dict[str, int | None]:
        """Resident memory of each running JVM, in KiB."""
        return {name: (rss_kib(pid) if (pid := p.pid()) is not None else None) for name, p in self.processes.items()}

    def status(self) -> str:
        running = self.running()
        rss = self.rss_kib()
        lines = [f"Apache RocketMQ {self.version} in {self.dir}, gRPC endpoint {self.endpoint} ({self.url})"]
        for name, proc in self.processes.items():
            pid = running[name]
            paused = ", paused" if pid and pid_state(pid) == "T" else ""
            state = f"pid {pid}{paused}, RSS {(rss[name] or 0) // 1024} MiB" if pid else "not running"
            ports = ", ".join(f":{p}" for p in proc.ports)
            lines.append(f"  {name}: {ports} {state}; log {proc.log}")
        lines.append(f"  answering: {'yes' if self.answering() else 'no'}")
        return "\n".join(lines)


def try_it(server: RocketMQServer) -> str:
    """What ``make rocketmq`` prints after starting: the zeroloss URL and the demo on it (quoted: the
    ``?`` is a glob character to zsh)."""
    return (
        f"zeroloss target: {server.zeroloss_url}\n"
        f"try it:          .venv/bin/zeroloss demo --target '{server.zeroloss_url}'  (or make demo-rocketmq)\n"
        f"                 (outbox -> relay, SIGKILLed once -> RocketMQ -> consumer with inbox; "
        f"prints lost 0, double effects 0)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.rocketmq_server", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser(
        "start",
        help="start the name server and broker (or say they are up) and wait until they serve; "
        "a server started from nothing starts on empty data",
    )
    stop = sub.add_parser("stop", help="stop both: SIGTERM, then SIGKILL")
    stop.add_argument("--wipe", action="store_true", help="also delete the data and logs")
    sub.add_parser("status", help="pids, memory and whether the ports answer")
    args = parser.parse_args(argv)
    server = RocketMQServer()
    try:
        if args.command == "start":
            missing = server.missing_tools()
            if missing:  # as the fixture: its tests skip on such a machine (make services runs this)
                print(
                    f"rocketmq_server: not started: no {' or '.join(missing)} on PATH "
                    f"(the tests marked rocketmq will skip; zeroloss demo --target rocketmq://... needs it)",
                    file=sys.stderr,
                )
                return 1 if os.environ.get("CI") else 0
            t0 = time.monotonic()
            if not any(server.running().values()):
                # from empty data, as the tests' fixture: topics of earlier runs (every test makes its
                # own) would otherwise pile up across runs on this machine and slow every start
                server.stop(wipe=True)
            if server.start():
                rss = ", ".join(f"{n} {(k or 0) // 1024} MiB" for n, k in server.rss_kib().items())
                print(f"rocketmq_server: up in {time.monotonic() - t0:.1f} s, {server.url} (RSS {rss})")
            else:
                print(f"rocketmq_server: already running, {server.url}")
            print(try_it(server))
        elif args.command == "stop":
            stopped = server.stop(wipe=args.wipe)
            said = f"stopped {', '.join(stopped)}" if stopped else "nothing was running"
            print(f"rocketmq_server: {said}{', data wiped' if args.wipe else ''}")
        else:
            print(server.status())
    except ServerError as e:
        print(f"rocketmq_server: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
