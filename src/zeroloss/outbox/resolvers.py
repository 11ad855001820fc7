"""Resolvers a relay can be given on the command line: did the app's transaction ``txid`` commit?

A spool's ``recover(resolver)`` asks one about the ``tmp/`` files a crash left behind (see
:data:`~zeroloss.outbox.base.Resolver`). The app must record the spool transaction id in its own
transaction (a column or a small table) for the answer to exist. Both resolvers answer True
(committed), False (rolled back) or None (cannot tell: the files go to ``doubt/``), and raise when
they could not ask (database down, command crashed, no answer in time): the files then stay in
``tmp/``, still blocking their keys, and the next recover asks again.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from typing import Any

import sqlalchemy as sa

from zeroloss.errors import ConfigError
from zeroloss.outbox.base import Resolver
from zeroloss.sqlurl import engine_of, make_engine


def sql_resolver(url: str | sa.Engine, query: str, timeout_s: float = 10.0) -> Resolver:
    """Runs ``query`` with ``:txid`` bound on the database at ``url`` (or the app's Engine, whose
    own connect timeouts then apply): a row means committed, no
    row means rolled back. Only sound when the row is written in the app's transaction, asked of
    the primary (a lagging replica says "no row" for a commit it has not seen) and after the
    transaction ended (``tmp_grace_s`` longer than the longest one). A database that does not
    answer within ``timeout_s`` (connect or statement) counts as not asked."""
    if ":txid" not in query:
        raise ConfigError(f"the resolver query must use the parameter :txid, got {query!r}")
    engine = (
        make_engine(url, connect_args=_timeouts(url, timeout_s))
        if isinstance(url, str)
        else engine_of(url, "sql_resolver")[0]
    )
    statement = sa.text(query)

    def resolve(txid: str) -> bool | None:
        with engine.connect() as conn:
            if conn.dialect.name == "postgresql":  # a lock held by a migration must not hang recover
                conn.exec_driver_sql(f"SET statement_timeout = {int(timeout_s * 1000)}")
            return conn.execute(statement, {"txid": txid}).first() is not None

    return resolve


def _timeouts(url: str, timeout_s: float) -> dict[str, Any]:
    scheme = url.split(":", 1)[0].split("+", 1)[0]
    if scheme in ("postgresql", "postgres"):
        return {"connect_timeout": max(1, int(timeout_s))}
    if scheme in ("mysql", "mariadb"):
        return {"connect_timeout": timeout_s, "read_timeout": timeout_s, "write_timeout": timeout_s}
    return {"timeout": timeout_s}  # sqlite3: how long to wait for a lock


COMMAND_ANSWERS = {"committed": True, "rolled-back": False, "unknown": None}
"""What a resolver command prints → its answer. Anything else (a crash's traceback, an empty
line, a non-zero exit) means it could not ask: the files stay in ``tmp/`` for the next recover.
Words, not exit codes: exit 1 is what every crashing script returns, and must never delete."""


def command_resolver(command: str, timeout_s: float = 10.0) -> Resolver:
    """Runs ``command TXID``, which prints ``committed``, ``rolled-back`` or ``unknown`` (the files
    go to ``doubt/``) and exits 0; anything else, or no answer within ``timeout_s``, raises and the
    question is asked again at the next recover."""
    argv = shlex.split(command)
    if not argv or shutil.which(argv[0]) is None:
        raise ConfigError(
            f"resolver command {command!r}: {argv[0] if argv else 'nothing'} is not an executable on PATH"
        )

    def resolve(txid: str) -> bool | None:
        try:
            done = subprocess.run([*argv, txid], capture_output=True, timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"resolver command gave no answer for {txid} within {timeout_s}s") from None
        said = done.stdout.decode(errors="replace").strip()
        if done.returncode != 0 or said not in COMMAND_ANSWERS:
            why = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or [said[:80]]
            raise RuntimeError(
                f"resolver command exited {done.returncode} for {txid} printing {said[:40]!r} "
                f"(expected exit 0 and one of {', '.join(COMMAND_ANSWERS)}): {why[0]}"
            )
        return COMMAND_ANSWERS[said]

    return resolve
