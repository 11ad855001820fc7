"""Resolvers a relay can be given on the command line: did the app's transaction ``txid`` commit?

A spool's ``recover(resolver)`` asks one about the ``tmp/`` files a crash left behind (see
:data:`~zeroloss.outbox.base.Resolver`). The app must record the spool transaction id in its own
transaction (a column or a small table) for the answer to exist. Both resolvers answer True
(committed), False (rolled back) or None (cannot tell: the files go to ``doubt/``), and raise when
they could not ask (database down, command crashed): the files then stay in ``tmp/`` and the next
recover asks again.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess

import sqlalchemy as sa

from zeroloss.errors import ConfigError
from zeroloss.outbox.base import Resolver
from zeroloss.sqlurl import make_engine


def sql_resolver(url: str, query: str) -> Resolver:
    """Runs ``query`` with ``:txid`` bound on the database at ``url``: a row means committed, no
    row means rolled back. Only sound when the row is written in the app's transaction."""
    if ":txid" not in query:
        raise ConfigError(f"the resolver query must use the parameter :txid, got {query!r}")
    engine = make_engine(url)
    statement = sa.text(query)

    def resolve(txid: str) -> bool | None:
        with engine.connect() as conn:
            return conn.execute(statement, {"txid": txid}).first() is not None

    return resolve


COMMAND_ANSWERS = {0: True, 1: False, 2: None}
"""Exit code of a resolver command → its answer; any other exit code is a failure to ask."""


def command_resolver(command: str, timeout_s: float = 30.0) -> Resolver:
    """Runs ``command TXID``: exit 0 committed, 1 rolled back, 2 cannot tell; anything else (or no
    answer within ``timeout_s``) raises, and the question is asked again at the next recover."""
    argv = shlex.split(command)
    if not argv or shutil.which(argv[0]) is None:
        raise ConfigError(f"resolver command {command!r}: {argv[0] if argv else 'nothing'} is not an executable "
                          "on PATH")

    def resolve(txid: str) -> bool | None:
        try:
            done = subprocess.run([*argv, txid], capture_output=True, timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"resolver command gave no answer for {txid} within {timeout_s}s") from None
        if done.returncode not in COMMAND_ANSWERS:
            said = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or [""]
            raise RuntimeError(f"resolver command exited {done.returncode} for {txid} (0 committed, 1 rolled "
                               f"back, 2 cannot tell): {said[0]}")
        return COMMAND_ANSWERS[done.returncode]

    return resolve
