"""The row-mode models on the cluster: two tenants whose primary keys collide."""

from __future__ import annotations

from sqlalchemy import ForeignKeyConstraint, MetaData, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

TENANTS = ("acme", "globex")
ORDERS_PER_TENANT = 20


class Base(DeclarativeBase):
    metadata = MetaData()


class Order(Base):
    __tablename__ = "citus_orders"

    tenant_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    note: Mapped[str] = mapped_column(Text)
    currency: Mapped[str] = mapped_column(String(3), default="EUR")

    items: Mapped[list[Item]] = relationship(back_populates="order", order_by="Item.id")


class Item(Base):
    """Colocated with its order: the foreign key carries the tenant column."""

    __tablename__ = "citus_items"
    __table_args__ = (
        ForeignKeyConstraint(
            ["tenant_id", "order_id"], ["citus_orders.tenant_id", "citus_orders.id"]
        ),
    )

    tenant_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    order_id: Mapped[int]
    sku: Mapped[str] = mapped_column(Text)

    order: Mapped[Order] = relationship(back_populates="items")


class Currency(Base):
    """Shared: a reference table, a copy on every node."""

    __tablename__ = "citus_currencies"

    code: Mapped[str] = mapped_column(String(3), primary_key=True)


SHARED = frozenset({"citus_currencies"})


def seed_rows() -> dict[str, list[dict[str, object]]]:
    """The same ids for every tenant; texts carry the owner so a leak is visible."""
    orders = [
        {"tenant_id": t, "id": i, "note": f"{t}-order-{i}", "currency": "EUR"}
        for t in TENANTS
        for i in range(1, ORDERS_PER_TENANT + 1)
    ]
    items = [
        {"tenant_id": t, "id": i, "order_id": (i % 5) + 1, "sku": f"{t}-sku-{i}"}
        for t in TENANTS
        for i in range(1, ORDERS_PER_TENANT + 1)
    ]
    return {
        "citus_currencies": [{"code": "EUR"}, {"code": "USD"}],
        "citus_orders": orders,
        "citus_items": items,
    }
