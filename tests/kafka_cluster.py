"""A real Apache Kafka cluster for tests: three combined broker+controller KRaft nodes on loopback.

The Tansu broker (``kafka`` fixture) is one process without replication; this cluster is what
fault tests need: RF 3, ``min.insync.replicas=2``, leaders that move, followers that fall out of
the ISR. The jars come from Maven Central through ``deploy/kafka/pom.xml`` into a cache outside
the repo; each node is ``java -cp 'libs/*' kafka.Kafka server.properties``.

    python -m tests.kafka_cluster start|stop [--wipe]|status

Nodes are tracked by pid files (``<dir>/node-N/pid``), not by child handles, so another process
(``make cluster-stop``, a later pytest run) can reuse or stop them. Settings from the environment:
``ZEROLOSS_CACHE`` (default ``~/.cache/zeroloss``), ``ZEROLOSS_KAFKA_VERSION`` (4.1.1),
``ZEROLOSS_KAFKA_DIR`` (data and logs, default ``<cache>/kafka-cluster``), ``ZEROLOSS_KAFKA_PORT``
(first client port, 19092), ``ZEROLOSS_KAFKA_CONTROLLER_PORT`` (first controller port, 19192),
``ZEROLOSS_KAFKA_JVM_OPTS``, ``ZEROLOSS_KAFKA_START_TIMEOUT`` (seconds, 180).
"""

from __future__ import annotations

import argparse
import base64
import logging
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

T = TypeVar("T")

REPO = Path(__file__).resolve().parent.parent
POM = REPO / "deploy" / "kafka" / "pom.xml"
LOG4J_CONFIG = REPO / "deploy" / "kafka" / "log4j2.properties"
NODE_IDS = (1, 2, 3)
CHECK_TOPIC = "zeroloss-cluster-check"
# Small heap, one GC thread, C1 only: three JVMs share 2 cores with the tests.
DEFAULT_JVM_OPTS = "-Xmx384m -Xms128m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -XX:+ExitOnOutOfMemoryError"

# librdkafka's connection errors while a node is down belong in the test's captured log, not stderr.
_rdkafka_log = logging.getLogger("tests.kafka_cluster.librdkafka")
_rdkafka_log.addHandler(logging.NullHandler())  # the CLI prints none of it; pytest still captures it via root


class ClusterError(ServiceError):
    """The cluster did not reach the state asked for in time; the message carries the node logs' tails."""


def _poll(what: str, deadline: float, check: Callable[[], T | None], interval: float = 0.2) -> T:
    return poll(what, deadline, check, interval, ClusterError)


def _new_cluster_id() -> str:
    # Kafka's Uuid text form: URL-safe base64 of 16 random bytes without padding, never starting with '-'.
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not text.startswith("-"):
            return text


@dataclass(frozen=True)
class Node(Jvm):
    id: int
    port: int
    controller_port: int
    dir: Path

    @property
    def props(self) -> Path:
        return self.dir / "server.properties"

    @property
    def log(self) -> Path:
        return self.dir / "node.log"

    @property
    def data(self) -> Path:
        return self.dir / "data"

    @property
    def marks(self) -> tuple[bytes, ...]:
        return b"kafka.Kafka", os.fsencode(self.props)


class KafkaCluster:
    """Three KRaft nodes (ids 1, 2, 3), each broker and controller, on 127.0.0.1."""

    def __init__(
        self,
        directory: str | os.PathLike[str] | None = None,
        *,
        version: str | None = None,
        port: int | None = None,
        controller_port: int | None = None,
        jvm_opts: str | None = None,
        extra_props: Mapping[str, str] | None = None,
    ) -> None:
        self.version = version or os.environ.get("ZEROLOSS_KAFKA_VERSION") or "4.1.1"
        self.dir = Path(directory or os.environ.get("ZEROLOSS_KAFKA_DIR") or cache_dir() / "kafka-cluster")
        self.libs = cache_dir() / f"kafka-{self.version}" / "libs"
        first = port or env_int("ZEROLOSS_KAFKA_PORT", 19092)
        first_controller = controller_port or env_int("ZEROLOSS_KAFKA_CONTROLLER_PORT", 19192)
        self.nodes = {
            i: Node(i, first + n, first_controller + n, self.dir / f"node-{i}") for n, i in enumerate(NODE_IDS)
        }
        refuse_ephemeral_ports(
            [p for n in self.nodes.values() for p in (n.port, n.controller_port)],
            "ZEROLOSS_KAFKA_PORT, ZEROLOSS_KAFKA_CONTROLLER_PORT",
            ClusterError,
        )
        self.jvm_opts = shlex.split(jvm_opts or os.environ.get("ZEROLOSS_KAFKA_JVM_OPTS") or DEFAULT_JVM_OPTS)
        self.extra_props = dict(extra_props or {})
        self.start_timeout = float(os.environ.get("ZEROLOSS_KAFKA_START_TIMEOUT") or 180)
        self._admin: Any = None

    # --- addresses ---------------------------------------------------------------------------
    @property
    def bootstrap(self) -> str:
        return ",".join(f"127.0.0.1:{n.port}" for n in self.nodes.values())

    @property
    def url(self) -> str:
        return f"kafka://{self.bootstrap}"

    def _node(self, node_id: int) -> Node:
        if node_id not in self.nodes:
            raise ValueError(f"node ids are {list(self.nodes)}, not {node_id}")
        return self.nodes[node_id]

    def _jars_cached(self) -> bool:
        return (self.libs / f"kafka_2.13-{self.version}.jar").exists()

    def missing_tools(self) -> list[str]:
        """What this machine lacks to run the cluster: java always, mvn only while the jars are not cached."""
        return missing_tools(self._jars_cached())

    # --- jars ----------------------------------------------------------------------------------
    def fetch_jars(self) -> None:
        """Copy the broker's jars from Maven into the cache, once per version."""
        if not self._jars_cached():
            fetch_jars(self.libs, POM, f"kafka.version={self.version}", f"Apache Kafka {self.version}", ClusterError)

    # --- node configuration --------------------------------------------------------------------
    def _properties(self, node: Node) -> str:
        voters = ",".join(f"{n.id}@127.0.0.1:{n.controller_port}" for n in self.nodes.values())
        props = {
            "process.roles": "broker,controller",
            "node.id": str(node.id),
            "controller.quorum.voters": voters,
            "listeners": f"PLAINTEXT://127.0.0.1:{node.port},CONTROLLER://127.0.0.1:{node.controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{node.port}",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "log.dirs": str(node.data),
            # What the fault tests rely on: every write on three replicas, acked by at least two.
            "num.partitions": "4",
            "default.replication.factor": "3",
            "min.insync.replicas": "2",
            "unclean.leader.election.enable": "false",
            "auto.create.topics.enable": "true",
            "offsets.topic.replication.factor": "3",
            "transaction.state.log.replication.factor": "3",
            "transaction.state.log.min.isr": "2",
            "share.coordinator.state.topic.replication.factor": "3",
            "share.coordinator.state.topic.min.isr": "2",
            # Fast start: no rebalance delay, 10 partitions instead of 50 for the internal topics.
            "group.initial.rebalance.delay.ms": "0",
            # The tests' consumers use a 2 s session (fast fail-over); Kafka's floor is 6 s.
            "group.min.session.timeout.ms": "1000",
            "offsets.topic.num.partitions": "10",
            "transaction.state.log.num.partitions": "10",
            # A killed node is fenced (and leaves every ISR) after 4 s instead of 9 s.
            "broker.heartbeat.interval.ms": "500",
            "broker.session.timeout.ms": "4000",
            "replica.lag.time.max.ms": "10000",
            # Few threads and a 16 MiB (not 128 MiB) cleaner buffer: 2 cores, 384 MiB heaps.
            "num.network.threads": "2",
            "num.io.threads": "2",
            "background.threads": "2",
            "num.replica.fetchers": "1",
            "num.recovery.threads.per.data.dir": "1",
            "log.cleaner.threads": "1",
            "log.cleaner.dedupe.buffer.size": str(16 * 1024 * 1024),
        }
        props.update(self.extra_props)
        return "".join(f"{k}={v}\n" for k, v in props.items())

    def _java(self) -> str:
        return java(ClusterError)

    def _format(self, nodes: Iterable[Node]) -> None:
        """Write each new node's meta.properties and bootstrap checkpoint (kafka-storage format)."""
        todo = [n for n in nodes if not (n.data / "meta.properties").exists()]
        if not todo:
            return
        id_file = self.dir / "cluster.id"
        if not id_file.exists():
            id_file.write_text(_new_cluster_id())
        cluster_id = id_file.read_text().strip()
        procs = []
        for node in todo:
            cmd = [
                self._java(),
                "-Xmx128m",
                "-XX:TieredStopAtLevel=1",
                "-XX:+UseSerialGC",
                f"-Dlog4j2.configurationFile={LOG4J_CONFIG}",
                "-cp",
                f"{self.libs}/*",
                "kafka.tools.StorageTool",
                "format",
                "-t",
                cluster_id,
                "-c",
                str(node.props),
            ]
            # Three JVMs at once: formatting is mostly JVM start-up.
            procs.append((node, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)))
        failed = []
        for node, proc in procs:
            try:
                out, _ = proc.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, _ = proc.communicate()
            if proc.returncode != 0:
                failed.append(f"node {node.id}: exit {proc.returncode}\n{out.decode(errors='replace')[-2000:]}")
        if failed:
            raise ClusterError("kafka-storage format failed:\n" + "\n".join(failed))

    def _launch(self, node: Node) -> None:
        """Start the node's JVM detached (its own session, adopted by init), its output to node.log."""
        for port in (node.port, node.controller_port):
            if port_open(port):
                raise ClusterError(f"port {port} of node {node.id} is taken by a process that is not this node")
        cmd = [
            self._java(),
            *self.jvm_opts,
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={LOG4J_CONFIG}",
            "-cp",
            f"{self.libs}/*",
            "kafka.Kafka",
            str(node.props),
        ]
        node.launch(cmd, node.log, f"node {node.id}")

    # --- admin helpers -------------------------------------------------------------------------
    def admin(self) -> Any:
        """One AdminClient for this object (it has no close; a dropped one fails its pending futures)."""
        if self._admin is None:
            from confluent_kafka.admin import AdminClient

            self._admin = AdminClient({"bootstrap.servers": self.bootstrap, "logger": _rdkafka_log})  # type: ignore[dict-item]
        return self._admin

    def client_config(self, **extra: Any) -> dict[str, Any]:
        """confluent-kafka settings for this cluster, librdkafka's log going to Python logging."""
        return {"bootstrap.servers": self.bootstrap, "logger": _rdkafka_log, **extra}

    def metadata(self, topic: str | None = None, timeout: float = 5.0) -> Any:
        """Cluster metadata asked of a node that runs and is not paused.

        A fresh client (about 60 ms), bootstrapped to those nodes only: a long-lived one keeps
        sending to a paused broker, whose socket accepts the request and never answers."""
        from confluent_kafka.admin import AdminClient

        up = [n for n in self.nodes.values() if (pid := n.pid()) is not None and pid_state(pid) != "T"]
        if not up:
            raise ClusterError("no node is running unpaused")
        admin = AdminClient({"bootstrap.servers": ",".join(f"127.0.0.1:{n.port}" for n in up), "logger": _rdkafka_log})  # type: ignore[dict-item]
        return admin.list_topics(topic=topic, timeout=timeout)

    def broker_ids(self, timeout: float = 5.0) -> set[int]:
        """Ids of the brokers the cluster's metadata lists as alive (fenced ones are left out)."""
        return set(self.metadata(timeout=timeout).brokers)

    def _partitions(self, topic: str, timeout: float = 5.0) -> dict[int, Any]:
        md = self.metadata(topic, timeout).topics[topic]
        if md.error is not None:
            raise ClusterError(f"topic {topic}: {md.error}")
        return dict(md.partitions)

    def leader_of(self, topic: str, partition: int = 0) -> int | None:
        """Node id leading ``topic``/``partition`` by the current metadata; None while it has none."""
        leader = int(self._partitions(topic)[partition].leader)
        return leader if leader >= 0 else None

    def replicas_of(self, topic: str, partition: int = 0) -> tuple[list[int], list[int]]:
        """(replicas, in-sync replicas) of ``topic``/``partition``."""
        p = self._partitions(topic)[partition]
        return list(p.replicas), list(p.isrs)

    def wait_in_sync(self, topic: str, timeout: float = 60.0, node_id: int | None = None) -> None:
        """Wait until every partition of ``topic`` has all 3 replicas in its ISR (or just ``node_id``)."""
        want = {node_id} if node_id is not None else set(self.nodes)
        last: dict[int, list[int]] = {}
        deadline = time.monotonic() + timeout

        def in_sync() -> bool | None:
            try:
                parts = self._partitions(topic, timeout=min(5.0, max(0.5, deadline - time.monotonic())))
            except ClusterError as e:
                if "UNKNOWN_TOPIC_OR_PART" in str(e):  # just created: not in every node's metadata yet
                    return None
                raise
            last.clear()
            last.update({i: list(p.isrs) for i, p in parts.items()})
            ok = bool(parts) and all(want <= set(p.isrs) and p.leader >= 0 for p in parts.values())
            return True if ok else None

        try:
            _poll(f"{topic} in sync", deadline, in_sync, interval=0.25)
        except ClusterError as e:
            raise ClusterError(f"{e}; ISR per partition: {last}") from None

    # --- lifecycle -------------------------------------------------------------------------------
    def running(self) -> dict[int, int | None]:
        """Node id -> pid of its JVM, None for a node that is not running."""
        return {i: n.pid() for i, n in self.nodes.items()}

    def answering(self, timeout: float = 5.0) -> bool:
        """All three nodes running from this directory, listening, and listed as brokers."""
        if not all(self.running().values()) or not all(port_open(n.port) for n in self.nodes.values()):
            return False
        try:
            return self.broker_ids(timeout) == set(self.nodes)
        except Exception:
            return False

    def start(self) -> bool:
        """Bring the cluster up; False if all three nodes were already answering (nothing started).

        A node that is down (killed by a test, say) is started on its old data."""
        if self.answering():
            return False
        deadline = time.monotonic() + self.start_timeout
        down = [n for n in self.nodes.values() if n.pid() is None]
        if len(down) == len(self.nodes) and all(port_open(n.port) for n in self.nodes.values()):
            raise ClusterError(
                f"ports {self.bootstrap} answer but no node runs from {self.dir}: "
                "another cluster (other ZEROLOSS_CACHE / ZEROLOSS_KAFKA_DIR?) holds them"
            )
        for node in down:  # before anything starts, so a clash leaves nothing to clean up
            for port in (node.port, node.controller_port):
                if port_open(port):
                    raise ClusterError(f"port {port} of node {node.id} is taken by a process that is not this node")
        self.fetch_jars()
        for node in down:
            node.dir.mkdir(parents=True, exist_ok=True)
            node.props.write_text(self._properties(node))
        try:
            self._format(down)
            for node in down:
                self._launch(node)
            self._wait_ready(deadline)
        except BaseException as e:
            logs = self.log_tails()
            self._stop_nodes(down)  # leave no half-started JVM behind
            if isinstance(e, ClusterError):
                raise ClusterError(f"{e}\n{logs}") from None
            raise
        return True

    def _wait_ready(self, deadline: float) -> None:
        """Wait on each condition in turn: ports, 3 brokers, an RF-3 topic in sync, idempotent and
        transactional produce, a consumer group commit (so __consumer_offsets exists)."""

        def alive(check: Callable[[], T | None]) -> Callable[[], T | None]:
            def guarded() -> T | None:  # a node that died will not come back: fail now, not at the deadline
                for node in self.nodes.values():
                    if node.pid() is None:
                        raise ClusterError(f"node {node.id} exited during start-up")
                return check()

            return guarded

        _poll(
            "the three client ports",
            deadline,
            alive(lambda: True if all(port_open(n.port) for n in self.nodes.values()) else None),
        )
        _poll(
            "3 brokers in the metadata",
            deadline,
            alive(lambda: True if self.broker_ids(timeout=2) == set(self.nodes) else None),
        )
        _poll(f"creating {CHECK_TOPIC} with RF 3", deadline, alive(self._create_check_topic), interval=0.5)
        self.wait_in_sync(CHECK_TOPIC, timeout=max(1.0, deadline - time.monotonic()))
        _poll("an idempotent acks=all produce", deadline, alive(self._idempotent_produce), interval=0.5)
        _poll("a transactional produce and commit", deadline, alive(self._transactional_produce), interval=0.5)
        _poll("a consumer group offset commit", deadline, alive(self._group_commit), interval=0.5)

    def _create_check_topic(self) -> bool:
        from confluent_kafka import KafkaError, KafkaException
        from confluent_kafka.admin import NewTopic

        futures = self.admin().create_topics([NewTopic(CHECK_TOPIC, 1, 3)], operation_timeout=10)
        try:
            futures[CHECK_TOPIC].result(timeout=15)
        except KafkaException as e:
            if e.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
        return True

    def _produce(self, producer: Any, value: bytes) -> None:
        errors: list[Any] = []
        producer.produce(CHECK_TOPIC, value, on_delivery=lambda err, _msg: errors.append(err))
        if producer.flush(15) != 0 or errors != [None]:  # RuntimeError: _poll tries again
            raise RuntimeError(f"produce to {CHECK_TOPIC} not acknowledged: {errors or 'no report in 15 s'}")

    def _idempotent_produce(self) -> bool:
        from confluent_kafka import Producer

        p = Producer(self.client_config(**{"enable.idempotence": True, "acks": "all", "message.timeout.ms": 15000}))
        try:
            self._produce(p, b"idempotent")
        finally:
            p.close()
        return True

    def _transactional_produce(self) -> bool:
        from confluent_kafka import Producer

        p = Producer(self.client_config(**{"transactional.id": "zeroloss-cluster-check", "message.timeout.ms": 15000}))
        try:
            p.init_transactions(30)
            p.begin_transaction()
            self._produce(p, b"transactional")
            p.commit_transaction(30)
        finally:
            p.close()
        return True

    def _group_commit(self) -> bool | None:
        from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

        c = Consumer(self.client_config(**{"group.id": "zeroloss-cluster-check", "enable.auto.commit": False}))
        try:
            c.assign([TopicPartition(CHECK_TOPIC, 0, OFFSET_BEGINNING)])
            msg = c.poll(10)
            if msg is None or msg.error():
                return None
            c.commit(message=msg, asynchronous=False)
        finally:
            c.close()
        return True

    def stop(self, wipe: bool = False, timeout: float = 30.0) -> list[int]:
        """Stop every node (SIGTERM, then SIGKILL after ``timeout``); ``wipe`` deletes data and logs.

        Returns the ids of the nodes that were running."""
        stopped = self._stop_nodes(self.nodes.values(), timeout)
        if wipe:
            shutil.rmtree(self.dir, ignore_errors=True)
        return stopped

    def _stop_nodes(self, nodes: Iterable[Node], timeout: float = 30.0) -> list[int]:
        return stop({n.id: n for n in nodes}, timeout, ClusterError)

    # --- per-node faults -----------------------------------------------------------------------
    def pid(self, node_id: int) -> int:
        pid = self._node(node_id).pid()
        if pid is None:
            raise ClusterError(f"node {node_id} is not running")
        return pid

    def kill(self, node_id: int, sig: int = signal.SIGKILL, timeout: float = 30.0) -> None:
        """Send ``sig`` to the node; for SIGKILL and SIGTERM, return once the JVM is gone."""
        os.kill(self.pid(node_id), sig)
        if sig in (signal.SIGKILL, signal.SIGTERM):
            node = self._node(node_id)
            # A JVM's main thread shows as a zombie while its other threads still exit and hold
            # the sockets: gone means no pid *and* both ports closed.
            _poll(
                f"node {node_id} to exit",
                time.monotonic() + timeout,
                lambda: (
                    True
                    if node.pid() is None and not port_open(node.port) and not port_open(node.controller_port)
                    else None
                ),
                interval=0.05,
            )
            self._node(node_id).pid_file.unlink(missing_ok=True)

    def pause(self, node_id: int) -> None:
        """SIGSTOP: the node keeps its sockets open but answers nothing (a hung broker)."""
        os.kill(self.pid(node_id), signal.SIGSTOP)

    def resume(self, node_id: int) -> None:
        os.kill(self.pid(node_id), signal.SIGCONT)

    def paused(self, node_id: int) -> bool:
        """The node's JVM runs but is stopped (SIGSTOP)."""
        pid = self._node(node_id).pid()
        return pid is not None and pid_state(pid) == "T"

    def restart(self, node_id: int, topic: str | None = None, timeout: float = 90.0) -> None:
        """Start a stopped node again on its data; wait until it is a broker again and, given
        ``topic``, back in the ISR of every partition of it."""
        node = self._node(node_id)
        if node.pid() is not None:
            raise ClusterError(f"node {node_id} is still running; kill it first")
        deadline = time.monotonic() + timeout
        try:
            self._launch(node)

            def back() -> bool | None:
                if node.pid() is None:
                    raise ClusterError(f"node {node_id} exited during restart")
                return True if port_open(node.port) and node_id in self.broker_ids(timeout=2) else None

            _poll(f"node {node_id} to answer as a broker", deadline, back)
            if topic is not None:
                self.wait_in_sync(topic, timeout=max(1.0, deadline - time.monotonic()), node_id=node_id)
        except ClusterError as e:
            raise ClusterError(f"{e}\n{self.log_tails([node_id])}") from None

    # --- reporting -------------------------------------------------------------------------------
    def log_tails(self, node_ids: Iterable[int] | None = None, lines: int = 25) -> str:
        ids = list(node_ids) if node_ids is not None else list(self.nodes)
        return "\n".join(f"--- node {i}: tail of {self.nodes[i].log}\n{tail(self.nodes[i].log, lines)}" for i in ids)

    def rss_kib(self) -> dict[int, int | None]:
        """Resident memory of each running node's JVM, in KiB."""
        return {i: (rss_kib(pid) if (pid := n.pid()) is not None else None) for i, n in self.nodes.items()}

    def status(self) -> str:
        running = self.running()
        rss = self.rss_kib()
        lines = [f"Apache Kafka {self.version} cluster in {self.dir}, bootstrap {self.bootstrap}"]
        for i, node in self.nodes.items():
            pid = running[i]
            paused = ", paused" if pid and pid_state(pid) == "T" else ""
            state = f"pid {pid}{paused}, RSS {(rss[i] or 0) // 1024} MiB" if pid else "not running"
            lines.append(f"  node {i}: :{node.port} (controller :{node.controller_port}) {state}; log {node.log}")
        lines.append(f"  answering: {'yes' if self.answering() else 'no'}")
        return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.kafka_cluster", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("start", help="start the three nodes (or say they are up) and wait until they serve")
    stop = sub.add_parser("stop", help="stop every node: SIGTERM, then SIGKILL")
    stop.add_argument("--wipe", action="store_true", help="also delete the data and logs")
    sub.add_parser("status", help="pids, memory and whether the cluster answers")
    args = parser.parse_args(argv)
    cluster = KafkaCluster()
    try:
        if args.command == "start":
            t0 = time.monotonic()
            if cluster.start():
                print(f"kafka_cluster: up in {time.monotonic() - t0:.1f} s, bootstrap {cluster.bootstrap}")
            else:
                print(f"kafka_cluster: already running, bootstrap {cluster.bootstrap}")
        elif args.command == "stop":
            stopped = cluster.stop(wipe=args.wipe)
            said = f"stopped nodes {stopped}" if stopped else "no node was running"
            print(f"kafka_cluster: {said}{', data wiped' if args.wipe else ''}")
        else:
            print(cluster.status())
    except ClusterError as e:
        print(f"kafka_cluster: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
