"""Models shared by the adversarial suites: two tenants whose primary keys collide."""

from __future__ import annotations

from sqlalchemy import ForeignKey, ForeignKeyConstraint, MetaData, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

TENANTS = ("acme", "globex")
ROWS_PER_TENANT = 20


class Base(DeclarativeBase):
    metadata = MetaData()


class Project(Base):
    __tablename__ = "projects"

    tenant_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(Text)

    tasks: Mapped[list[Task]] = relationship(back_populates="project", lazy="select")


class Task(Base):
    __tablename__ = "tasks"
    __table_args__ = (
        ForeignKeyConstraint(["tenant_id", "project_id"], ["projects.tenant_id", "projects.id"]),
    )

    tenant_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    project_id: Mapped[int]
    title: Mapped[str] = mapped_column(Text)

    project: Mapped[Project] = relationship(back_populates="tasks")


class Account(Base):
    """Surrogate keys unique across tenants: a foreign key of one column can cross tenants."""

    __tablename__ = "accounts"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    tenant_id: Mapped[str] = mapped_column(String(63), index=True)
    name: Mapped[str] = mapped_column(Text)

    notes: Mapped[list[Note]] = relationship(
        back_populates="account", cascade="all, delete-orphan", order_by="Note.id"
    )


class Note(Base):
    __tablename__ = "notes"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    tenant_id: Mapped[str] = mapped_column(String(63), index=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"))
    body: Mapped[str] = mapped_column(Text)

    account: Mapped[Account] = relationship(back_populates="notes")


class Currency(Base):
    """A shared table: no tenant column, visible to all."""

    __tablename__ = "currencies"

    code: Mapped[str] = mapped_column(String(3), primary_key=True)


def seed_rows(tenants: tuple[str, ...] = TENANTS) -> dict[str, list[dict[str, object]]]:
    """The same ids for every tenant; names carry the owner so a leak is visible."""
    projects = [
        {"tenant_id": t, "id": i, "name": f"{t}-project-{i}"}
        for t in tenants
        for i in range(1, ROWS_PER_TENANT + 1)
    ]
    tasks = [
        {"tenant_id": t, "id": i, "project_id": (i % 5) + 1, "title": f"{t}-task-{i}"}
        for t in tenants
        for i in range(1, ROWS_PER_TENANT + 1)
    ]
    # Each tenant owns accounts 10n+1 and 10n+2 and a note on its own first account. Every tenant
    # but the first also owns a note on the FIRST tenant's account 1: a key across tenants.
    accounts = [
        {"tenant_id": t, "id": 10 * n + k, "name": f"{t}-account-{10 * n + k}"}
        for n, t in enumerate(tenants)
        for k in (1, 2)
    ]
    notes = [
        {"tenant_id": t, "id": 10 * n + 1, "account_id": 10 * n + 1, "body": f"{t}-note-own"}
        for n, t in enumerate(tenants)
    ] + [
        {"tenant_id": t, "id": 10 * n + 2, "account_id": 1, "body": f"{t}-note-across"}
        for n, t in enumerate(tenants)
        if n > 0
    ]
    return {
        "projects": projects,
        "tasks": tasks,
        "accounts": accounts,
        "notes": notes,
        "currencies": [{"code": "EUR"}, {"code": "USD"}],
    }
