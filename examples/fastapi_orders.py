"""FastAPI + the SQLAlchemy ORM (docs/recipes/fastapi.md): an order and its message commit in the
request's one transaction; a consumer bills it with the ORM inside the inbox's transaction.

Run it: ``uvicorn --factory examples.fastapi_orders:main_app`` with ``SHOP_DB`` set (default ``sqlite:///shop.db``),
``zeroloss relay --source $SHOP_DB --target kafka://127.0.0.1:9092`` beside it, and
``python -m examples.fastapi_orders`` for the consumer (``BILLING_DB``, ``BROKER``)."""

# No `from __future__ import annotations`: FastAPI reads the endpoint's annotations at run time, and
# `transaction` below is local to create_app.
import os
from collections.abc import Iterator
from decimal import Decimal
from typing import Annotated

from fastapi import Depends, FastAPI
from pydantic import BaseModel
from sqlalchemy import Connection, Numeric, String, create_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from zeroloss import Consumer, SqlInbox, SqlOutbox


class Base(DeclarativeBase):
    pass


class OrderRow(Base):
    __tablename__ = "orders"
    id: Mapped[int] = mapped_column(primary_key=True)
    customer: Mapped[str] = mapped_column(String(100))
    total: Mapped[Decimal] = mapped_column(Numeric(12, 2))


class Invoice(Base):
    __tablename__ = "invoices"
    order_id: Mapped[int] = mapped_column(primary_key=True)  # one invoice per order, whatever is redelivered
    customer: Mapped[str] = mapped_column(String(100))
    total: Mapped[Decimal] = mapped_column(Numeric(12, 2))


class NewOrder(BaseModel):
    customer: str
    total: Decimal


class Order(BaseModel):
    """The API's answer and the message's schema, on both sides."""

    id: int
    customer: str
    total: Decimal


def create_app(db_url: str) -> FastAPI:
    engine = create_engine(db_url)
    Base.metadata.create_all(engine, tables=[Base.metadata.tables["orders"]])  # your migrations, in a real app
    outbox = SqlOutbox(engine)
    outbox.create_schema()  # or `zeroloss init --source URL` at deploy time
    sessions = sessionmaker(engine)
    app = FastAPI()

    # [recipe:create_order]
    def transaction() -> Iterator[Session]:
        with sessions.begin() as session:  # commits when the request succeeds, rolls back when it raises
            yield session

    @app.post("/orders", status_code=201)
    def create_order(new: NewOrder, session: Annotated[Session, Depends(transaction)]) -> Order:
        row = OrderRow(customer=new.customer, total=new.total)
        session.add(row)
        session.flush()  # the id, from the database
        order = Order(id=row.id, customer=row.customer, total=row.total)
        outbox.add(session, topic="orders", key=order.customer, value=order)  # a pydantic model: JSON; same transaction
        return order

    # [/recipe]

    app.state.engine, app.state.outbox = engine, outbox
    return app


def billing(broker: str, db_url: str, *, topic: str = "orders", group: str = "billing") -> Consumer:
    engine = create_engine(db_url)
    Base.metadata.create_all(engine, tables=[Base.metadata.tables["invoices"]])
    inbox = SqlInbox(engine)
    inbox.create_schema()  # the inbox table, with your migrations in a real app
    consumer = Consumer(broker, group=group, topics=[topic], inbox=inbox)

    # [recipe:bill]
    @consumer.handler(model=Order)  # the JSON value, validated into the same pydantic model
    def bill(order: Order, tx: Connection) -> None:
        # The ORM on the inbox's transaction: the session's flush runs in it, and the consumer
        # commits it together with the inbox row (never call session.commit() here).
        with Session(bind=tx) as session:
            session.add(Invoice(order_id=order.id, customer=order.customer, total=order.total))
            session.flush()

    # [/recipe]

    return consumer


def main_app() -> FastAPI:
    """For ``uvicorn --factory examples.fastapi_orders:main_app``."""
    return create_app(os.environ.get("SHOP_DB", "sqlite:///shop.db"))


if __name__ == "__main__":
    billing(
        os.environ.get("BROKER", "kafka://127.0.0.1:9092"), os.environ.get("BILLING_DB", "sqlite:///billing.db")
    ).run()
