"""An application writing to a file spool, for the crash-before-promotion chaos scenario; it runs
until SIGKILLed.

usage: python tests/chaos/spool_writer.py SPOOL_DIR JOURNAL TOPIC RUN HANG_AFTER

Four threads write transactions of 3 messages each (key ``RUN-THREAD``, transaction id
``RUN-THREAD-N``). The journal is the app's database: a transaction has committed once its line
(txid and message ids) is appended, inside the spool block, before the spool promotes its files.
Thread 0's transaction number HANG_AFTER commits and then hangs before promotion, so every kill
leaves at least one committed transaction in tmp/.
"""

from __future__ import annotations

import os
import sys
import threading


def main(argv: list[str]) -> int:
    from zeroloss.outbox.spool import FileSpool

    root, journal_path, topic, run, hang_after = argv
    spool = FileSpool(root)
    journal = os.open(journal_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def writer(t: int) -> None:
        key = f"{run}-{t}".encode()
        for i in range(10_000_000):
            txid = f"{run}-{t}-{i}"
            with spool.transaction(txid) as tx:
                ids = [tx.add(topic=topic, value=f"{txid}/{j}".encode(), key=key) for j in range(3)]
                os.write(journal, f"{txid} {' '.join(ids)}\n".encode())  # the commit: one atomic append
                if t == 0 and i == int(hang_after):
                    threading.Event().wait()  # committed, not promoted: the kill finds it here

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
