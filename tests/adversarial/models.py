"""Models shared by the adversarial suites: two tenants whose primary keys collide."""

from __future__ import annotations

from sqlalchemy import ForeignKeyConstraint, MetaData, String, Text
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
    return {"projects": projects, "tasks": tasks, "currencies": [{"code": "EUR"}, {"code": "USD"}]}
