"""What the test servers that run on the machine's Java share: the three-broker Kafka cluster
(tests/kafka_cluster.py) and the RocketMQ server (tests/rocketmq_server.py).

Their jars come from Maven Central into a cache outside the repo; each JVM is started detached (its
own session, adopted by init) and tracked by a pid file checked against /proc, so any process (a
later pytest run, ``make cluster-stop``) can reuse or stop it.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
K = TypeVar("K", int, str)


class ServiceError(RuntimeError):
    """A server did not reach the state asked for in time; the message says which and why."""


def cache_dir() -> Path:
    return Path(os.environ.get("ZEROLOSS_CACHE") or Path.home() / ".cache" / "zeroloss")


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def env_int(name: str, default: int) -> int:
    return int(os.environ.get(name) or default)


def tail(path: Path, lines: int = 25) -> str:
    """The last ``lines`` lines of a log (of its last 64 KiB)."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def poll(
    what: str,
    deadline: float,
    check: Callable[[], T | None],
    interval: float = 0.2,
    error: type[ServiceError] = ServiceError,
) -> T:
    """Call ``check`` until it returns something other than None (or raises a ServiceError).

    Other exceptions count as "not yet" and the last one is quoted in the timeout's ``error``."""
    last: BaseException | None = None
    while True:
        try:
            result = check()
            if result is not None:
                return result
        except ServiceError:
            raise
        except Exception as e:
            last = e
        if time.monotonic() >= deadline:
            raise error(f"timed out waiting for {what}" + (f" (last error: {last})" if last else ""))
        time.sleep(interval)


def refuse_ephemeral_ports(ports: Iterable[int], settings: str, error: type[ServiceError]) -> None:
    """Raise ``error`` for a port in the kernel's range of source ports for outgoing connections:
    while its server is down, any connection may be given it, and the restarted server then fails
    with "Address already in use" (seen here). ``settings`` names the variables that move them."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999  # Linux's default
    clash = [p for p in ports if low <= p <= high]
    if clash:
        raise error(f"ports {clash} lie in the kernel's ephemeral range {low}-{high}: pick ports below it ({settings})")


def pid_state(pid: int) -> str | None:
    """The process's state letter from /proc (R, S, T, Z, ...), None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat[stat.rindex(")") + 2]  # the command name in parentheses may itself contain spaces


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return None


def java(error: type[ServiceError]) -> str:
    home = os.environ.get("JAVA_HOME")
    path = str(Path(home) / "bin" / "java") if home else shutil.which("java")
    if not path or not Path(path).exists():
        raise error("no `java` (17 or newer) on PATH or in JAVA_HOME")
    return path


def missing_tools(jars_cached: bool) -> list[str]:
    """What this machine lacks to run a server: java always, mvn only while the jars are not cached."""
    missing = [] if os.environ.get("JAVA_HOME") or shutil.which("java") else ["java"]
    if not jars_cached and shutil.which("mvn") is None:
        missing.append("mvn")
    return missing


def fetch_jars(libs: Path, pom: Path, version_setting: str, what: str, error: type[ServiceError]) -> None:
    """``mvn dependency:copy-dependencies`` of ``pom`` (with ``-D<version_setting>``) into ``libs``.

    Into a scratch folder first, renamed when complete, so an interrupted fetch is not taken as a cache."""
    mvn = shutil.which("mvn")
    if mvn is None:
        raise error(f"no {what} jars in {libs} and no `mvn` on PATH to fetch them")
    print(f"fetching {what} jars with Maven into {libs}", flush=True)
    scratch = libs.with_name(f"libs.partial-{os.getpid()}")
    shutil.rmtree(scratch, ignore_errors=True)
    cmd = [
        mvn,
        "-q",
        "-B",
        "-f",
        str(pom),
        f"-D{version_setting}",
        "dependency:copy-dependencies",
        f"-DoutputDirectory={scratch}",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    if done.returncode != 0:
        shutil.rmtree(scratch, ignore_errors=True)
        raise error(f"{shlex.join(cmd)} failed ({done.returncode}):\n{(done.stdout + done.stderr)[-4000:]}")
    try:
        scratch.rename(libs)
    except OSError:  # another process finished the same fetch first
        shutil.rmtree(scratch, ignore_errors=True)


class Jvm:
    """One JVM of a server, found by its pid file or, without a good one, by its command line.

    Subclasses (frozen dataclasses) give ``dir`` and ``marks``: arguments only this JVM's command
    line has (its main class, its own configuration file)."""

    dir: Path

    @property
    def marks(self) -> tuple[bytes, ...]:
        raise NotImplementedError

    @property
    def pid_file(self) -> Path:
        return self.dir / "pid"

    def _is_me(self, pid: int) -> bool:
        state = pid_state(pid)
        if state is None or state in "ZX":  # a zombie: dead, only not reaped yet by whoever adopted it
            return False
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (FileNotFoundError, ProcessLookupError):
            return False
        return all(mark in args for mark in self.marks)

    def pid(self) -> int | None:
        """The pid of this JVM if it is running (stopped by SIGSTOP counts), else None.

        The pid file is checked against the command line (pids get recycled); without a good pid
        file, /proc is searched, so a JVM whose pid file was lost can still be stopped."""
        try:
            pid = int(self.pid_file.read_text().strip())
            if self._is_me(pid):
                return pid
        except (FileNotFoundError, ValueError):
            pass
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and self._is_me(int(entry.name)):
                return int(entry.name)
        return None

    def launch(self, cmd: list[str], log: Path, title: str) -> None:
        """Start ``cmd`` detached (its own session, adopted by init), its output appended to ``log``."""
        # The shell backgrounds the JVM and exits: no Popen is left to reap, whichever process stops it.
        script = f"{shlex.join(cmd)} </dev/null >>{shlex.quote(str(log))} 2>&1 & echo $!"
        with log.open("a") as out:
            out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting {title}: {shlex.join(cmd)}\n")
        done = subprocess.run(
            ["sh", "-c", script],
            capture_output=True,
            text=True,
            timeout=30,
            start_new_session=True,
            check=True,
            cwd=self.dir,
        )
        pid = int(done.stdout.strip())
        self.pid_file.write_text(f"{pid}\n")
        # Until the forked shell has exec'd java its command line is the shell's, and pid() would
        # say "not running" (a restart check read that as "exited"): wait for the exec or the exit.
        deadline = time.monotonic() + 10
        while not self._is_me(pid) and pid_state(pid) not in (None, "Z", "X") and time.monotonic() < deadline:
            time.sleep(0.01)


def wait_exit(jvms: Iterable[Jvm], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while any(j.pid() is not None for j in jvms):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


def stop(jvms: Mapping[K, Jvm], timeout: float, error: type[ServiceError]) -> list[K]:
    """SIGTERM each running JVM, SIGKILL those still there after ``timeout``; the keys of those
    that were running, sorted."""
    running = {key: jvm for key, jvm in jvms.items() if jvm.pid() is not None}
    for jvm in running.values():
        if (pid := jvm.pid()) is not None:
            os.kill(pid, signal.SIGCONT)  # a paused JVM cannot act on SIGTERM
            os.kill(pid, signal.SIGTERM)
    if not wait_exit(running.values(), timeout):
        for jvm in running.values():
            if (pid := jvm.pid()) is not None:
                os.kill(pid, signal.SIGKILL)
        if not wait_exit(running.values(), 10):
            raise error(f"{[k for k, j in running.items() if j.pid()]} survived SIGKILL")
    for jvm in running.values():
        jvm.pid_file.unlink(missing_ok=True)
    return sorted(running)
