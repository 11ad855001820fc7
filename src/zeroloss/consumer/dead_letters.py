"""Dead letters: the envelope a message the consumer gave up on travels in, and how it is published.
The details: docs/design.md, "consumer/dead_letters.py"."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from zeroloss.backoff import backoff_s
from zeroloss.brokers.base import DLQ_SUFFIX, dlq_topic, publish_one
from zeroloss.brokers.kafka import KafkaBroker
from zeroloss.durable_dirs import make_durable_dirs
from zeroloss.errors import BrokerError
from zeroloss.message import ID_HEADER, Headers, Message, decode, encode

log = logging.getLogger(__name__)

PREFIX = "zeroloss-dlq-"
H_ERROR_TYPE = PREFIX + "error-type"
H_ERROR_MESSAGE = PREFIX + "error-message"
H_ATTEMPTS = PREFIX + "attempts"
H_ORIGINAL_TOPIC = PREFIX + "original-topic"
H_ORIGINAL_PARTITION = PREFIX + "original-partition"
H_ORIGINAL_OFFSET = PREFIX + "original-offset"
H_FIRST_FAILURE = PREFIX + "first-failure"
H_SHRUNK = PREFIX + "shrunk"  # "error-truncated" / "error-dropped": the broker refused the full letter
MAX_ERROR_CHARS = 2000
SHRUNK_ERROR_CHARS = 200
PARKED_SUFFIX = ".zlm"


def dead_letter(
    *,
    message_id: str,
    topic: str,
    partition: int,
    offset: int,
    key: bytes | None,
    value: bytes | None,
    headers: Headers,
    error: BaseException,
    attempts: int,
    first_failure: float,
    suffix: str = DLQ_SUFFIX,
) -> Message:
    """The dead-letter message for a record the consumer gives up on."""
    kept = tuple((k, v) for k, v in headers if k != ID_HEADER and not k.startswith(PREFIX))
    ours = (
        (H_ERROR_TYPE, type(error).__name__.encode()),
        (H_ERROR_MESSAGE, str(error)[:MAX_ERROR_CHARS].encode("utf-8", "replace")),
        (H_ATTEMPTS, str(attempts).encode()),
        (H_ORIGINAL_TOPIC, topic.encode()),
        (H_ORIGINAL_PARTITION, str(partition).encode()),
        (H_ORIGINAL_OFFSET, str(offset).encode()),
        (H_FIRST_FAILURE, repr(first_failure).encode()),
    )
    return Message(id=message_id, topic=dlq_topic(topic, suffix), value=value or b"", key=key, headers=kept + ours)


def smaller(letter: Message) -> list[Message]:
    """Smaller forms of a dead letter the broker refused for good: the error message cut short,
    then no error headers but the origin (what ``replay`` needs)."""
    keep = (H_ORIGINAL_TOPIC, H_ORIGINAL_PARTITION, H_ORIGINAL_OFFSET)
    cut = tuple((k, v[:SHRUNK_ERROR_CHARS] if k == H_ERROR_MESSAGE else v) for k, v in letter.headers)
    bare = tuple((k, v) for k, v in letter.headers if not k.startswith(PREFIX) or k in keep)
    return [
        replace(letter, headers=(*cut, (H_SHRUNK, b"error-truncated"))),
        replace(letter, headers=(*bare, (H_SHRUNK, b"error-dropped"))),
    ]


class ParkingLot:
    """Dead letters no broker would take, one file each in ``root`` (made on first use)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = os.path.abspath(root)  # the log names it; a later chdir must not move it

    def park(self, letter: Message, why: str) -> str:
        """Write ``letter`` durably (file and directory fsynced) and return its path; OSError if
        it could not be: then nothing may be acked."""
        make_durable_dirs(self.root)  # not only once: an operator may remove it once it is empty
        name = f"{time.time_ns()}-{uuid.uuid4().hex[:12]}"
        tmp, path = os.path.join(self.root, f".{name}.tmp"), os.path.join(self.root, name + PARKED_SUFFIX)
        data = encode(replace(letter, last_error=why))
        # Opened before the rename: Linux reports a writeback error to each descriptor open when
        # it happened, once. A descriptor opened after another park's fsync took the error (of
        # writing out our rename too) would be told nothing, and the letter acked while its name
        # may not be on the disk.
        dirfd = os.open(self.root, os.O_RDONLY)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            try:
                try:
                    _write_all(fd, data)
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError:
                # Not left behind: each try of a full disk would add one more part-written file
                # that parked() never lists and nothing ever removes.
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            os.rename(tmp, path)
            try:
                os.fsync(dirfd)
            except OSError:
                # The message is held and parked again on the next try: this copy would be a
                # second file of the same letter once the directory is written out after all.
                with contextlib.suppress(OSError):
                    os.unlink(path)
                raise
        finally:
            os.close(dirfd)
        return path


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def parked(root: str | os.PathLike[str]) -> list[tuple[str, Message]]:
    """Every parked letter in ``root``, oldest first: (path, the letter with the refusal in
    ``last_error``)."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        return []
    out = []
    for name in sorted(n for n in os.listdir(root) if n.endswith(PARKED_SUFFIX)):
        path = os.path.join(root, name)
        with open(path, "rb") as f:
            out.append((path, decode(f.read())))
    return out


def store_letter(
    letter: Message,
    publish: Callable[[Message], str],
    lot: ParkingLot,
    stop: threading.Event,
    backoff_base_s: float,
    max_backoff_s: float,
) -> tuple[str, bool] | None:
    """Store a dead letter: ``publish`` it (which raises BrokerError); refused for good, its
    :func:`smaller` forms; refused still, park it. Retriable failures (and a parking lot that
    cannot be written) back off and try again, holding the original. Returns (where, parked), or
    None if ``stop`` was set while waiting."""
    failures = 0
    while True:
        try:
            refusal: BrokerError | None = None
            for form in (letter, *smaller(letter)):
                try:
                    where = publish(form)
                except BrokerError as exc:
                    if exc.retriable:
                        raise
                    refusal = exc
                    continue
                if refusal is not None:
                    log.error(
                        "dead letter %s refused as it was (%s); stored %s to %s",
                        letter.id,
                        refusal,
                        (form.header(H_SHRUNK) or b"").decode(),
                        where,
                    )
                return where, False
            return lot.park(letter, f"refused by the broker: {refusal}"), True
        except (BrokerError, OSError) as err:
            failures += 1
            log.error("message %s: dead letter not stored (%s); the message is held", letter.id, err)
        if stop.wait(backoff_s(failures, backoff_base_s, max_backoff_s)):
            return None


class DeadLetterPublisher:
    """Publishes dead letters with an idempotent, acks=all producer and waits for the delivery
    report; :meth:`publish` returns only once the broker has the message, else raises."""

    def __init__(self, url: str, *, timeout_s: float = 30.0, config: dict[str, Any] | None = None) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.config = config
        self._broker: KafkaBroker | None = None

    def publish(self, msg: Message) -> str:
        if self._broker is None:
            self._broker = KafkaBroker(self.url, timeout_s=self.timeout_s, config=self.config)
        return publish_one(self._broker, msg, "dead letter")

    def deliver(
        self,
        msg: Message,
        stop: threading.Event,
        backoff_base_s: float,
        max_backoff_s: float,
        *,
        raise_rejected: bool = False,
    ) -> str | None:
        """:meth:`publish` until it succeeds, backing off between tries (the consumer holds the
        offset meanwhile); the location, or None if ``stop`` was set while waiting. With
        ``raise_rejected`` a refusal for good (too large, say) is raised instead of retried."""
        failures = 0
        while True:
            try:
                return self.publish(msg)
            except BrokerError as err:
                if raise_rejected and not err.retriable:
                    raise
                failures += 1
                log.error("message %s: publishing to %s failed (%s); its offset is held", msg.id, msg.topic, err)
            if stop.wait(backoff_s(failures, backoff_base_s, max_backoff_s)):
                return None

    def close(self) -> None:
        if self._broker is not None:
            self._broker.close()
            self._broker = None
