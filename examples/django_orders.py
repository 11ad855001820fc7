"""Django (docs/recipes/django.md): ``transaction.atomic()`` holds the order and its message,
``outbox.add`` going through Django's own connection.

A real project has the model in an app's ``models.py`` and the settings in ``settings.py``; this
file sets both up in a few lines so that it runs alone: ``python -m examples.django_orders URL``
(a SQL URL: ``postgresql://user@host/db`` or ``sqlite:///shop.db``). It places two orders, lets a
third roll back, shows that ``add`` outside ``atomic`` (or with an outbox on another kind of
database) is refused, and prints what it did as JSON.
"""

from __future__ import annotations

import json
import sys
from decimal import Decimal
from typing import Any

import django
from django.conf import settings
from sqlalchemy.engine import make_url

from zeroloss import ConfigError, SqlOutbox


def django_database(url: str) -> dict[str, Any]:
    """Django's DATABASES entry for a SQL URL (settings.py holds this in a real project)."""
    u = make_url(url)
    if u.get_backend_name() == "sqlite":
        return {"ENGINE": "django.db.backends.sqlite3", "NAME": u.database}
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": u.database,
        "USER": u.username or "",
        "PASSWORD": u.password or "",
        "HOST": u.host or "",
        "PORT": str(u.port or ""),
    }


def main(url: str) -> dict[str, Any]:
    settings.configure(DATABASES={"default": django_database(url)}, INSTALLED_APPS=[], USE_TZ=True)
    django.setup()
    from django.db import connection, models, transaction

    class Order(models.Model):  # models.py
        customer = models.CharField(max_length=100)
        total = models.DecimalField(max_digits=12, decimal_places=2)

        class Meta:
            app_label = "shop"

    with connection.schema_editor() as editor:  # `manage.py migrate`, here
        editor.create_model(Order)
    # [recipe:place_order]
    outbox = SqlOutbox(url)  # the same database as Django's, for the relay's side
    outbox.create_schema()  # or `zeroloss init --source URL`

    def place_order(customer: str, total: Decimal) -> Order:  # a view's body
        with transaction.atomic():
            order = Order.objects.create(customer=customer, total=total)
            # the value is JSON; its Decimal total goes as "99.50"
            outbox.add(
                connection, topic="orders", key=customer, value={"id": order.pk, "customer": customer, "total": total}
            )
            return order

    # [/recipe]

    placed = [place_order("customer-7", Decimal("99.50")), place_order("customer-8", Decimal("12.00"))]
    try:
        with transaction.atomic():
            Order.objects.create(customer="customer-9", total=Decimal("1.00"))
            outbox.add(connection, topic="orders", key="customer-9", value={"customer": "customer-9"})
            raise RuntimeError("payment refused")  # the order and its message roll back together
    except RuntimeError:
        pass
    try:
        outbox.add(connection, topic="orders", value={"outside": "atomic"})
        refused = ""
    except ConfigError as exc:
        refused = str(exc)
    other = SqlOutbox("sqlite://" if connection.vendor != "sqlite" else "postgresql://nobody@127.0.0.1:1/none")
    try:
        with transaction.atomic():
            other.add(connection, topic="orders", value=b"x")  # an outbox on another kind of database
        mismatch = ""
    except ConfigError as exc:
        mismatch = str(exc)
    other.close()
    outbox.close()
    return {"placed": [o.pk for o in placed], "orders": Order.objects.count(), "refused": refused, "mismatch": mismatch}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1] if len(sys.argv) > 1 else "sqlite:///shop.db")))
