"""A real InnoDB deadlock inside a handler's transaction, for the tests that check a swallowed
one is noticed: two transactions lock two rows in opposite order, driven by events, no sleeps."""

from __future__ import annotations

import threading
import uuid

import sqlalchemy as sa
from sqlalchemy.exc import OperationalError

ER_LOCK_DEADLOCK = 1213


class Deadlock:
    """Rows 1 and 2 of a fresh table. :meth:`in_handler` locks row 1 in the handler's transaction
    while a rival thread holds row 2, then each asks for the other's row. The rival has written
    many rows first, so InnoDB rolls back the lighter transaction — the handler's."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self.rows = sa.Table(
            f"zl_locks_{uuid.uuid4().hex[:10]}",
            sa.MetaData(),
            sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("v", sa.Integer),
        )
        self.rows.create(engine)
        with engine.begin() as conn:
            conn.execute(self.rows.insert(), [{"id": 1, "v": 0}, {"id": 2, "v": 0}])
        self.caught: list[OperationalError] = []
        self.rival_errors: list[BaseException] = []

    def _bump(self, conn: sa.Connection, row: int) -> None:
        conn.execute(self.rows.update().where(self.rows.c.id == row).values(v=self.rows.c.v + 1))

    def in_handler(self, tx: sa.Connection) -> None:
        """Run from the handler: returns once the handler's transaction lost the deadlock, with
        the error caught and ignored (the fault under test); AssertionError if it did not."""
        rival_has_2, handler_has_1 = threading.Event(), threading.Event()

        def rival() -> None:
            try:
                with self.engine.begin() as conn:
                    self._bump(conn, 2)
                    conn.execute(self.rows.insert(), [{"id": 100 + i, "v": 0} for i in range(200)])  # weight
                    rival_has_2.set()
                    assert handler_has_1.wait(30)
                    self._bump(conn, 1)  # waits for the handler's lock until InnoDB breaks the cycle
            except BaseException as exc:
                self.rival_errors.append(exc)
                raise

        thread = threading.Thread(target=rival, daemon=True)
        thread.start()
        assert rival_has_2.wait(30), self.rival_errors
        self._bump(tx, 1)
        handler_has_1.set()
        try:
            self._bump(tx, 2)  # the cycle closes on whichever request comes second
        except OperationalError as exc:  # the handler's mistake: it carries on as if nothing happened
            assert exc.orig is not None and exc.orig.args[0] == ER_LOCK_DEADLOCK, exc
            self.caught.append(exc)
        thread.join(30)
        assert not thread.is_alive() and not self.rival_errors, self.rival_errors
        assert self.caught, "the handler's transaction was not the deadlock's victim"

    def drop(self) -> None:
        self.rows.drop(self.engine)
