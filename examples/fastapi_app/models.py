"""Projects and tasks. Every row carries its tenant; primary keys collide across tenants."""

from __future__ import annotations

from sqlalchemy import Boolean, ForeignKeyConstraint, Integer, MetaData, Sequence, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from asgi_tenancy import current_tenant

METADATA = MetaData()
# One sequence for every table: demo rows take ids 1, 2, 3; new rows start at 1000.
ID_SEQUENCE = Sequence("demo_ids", start=1000, metadata=METADATA)


def _tenant_id() -> str:
    # Stamped from the scope for every strategy; RLS and query scoping also check it.
    return current_tenant().id


class Base(DeclarativeBase):
    metadata = METADATA


class Project(Base):
    __tablename__ = "projects"

    tenant_id: Mapped[str] = mapped_column(String(63), primary_key=True, default=_tenant_id)
    id: Mapped[int] = mapped_column(Integer, ID_SEQUENCE, primary_key=True)
    name: Mapped[str] = mapped_column(Text)

    tasks: Mapped[list[Task]] = relationship(
        back_populates="project", cascade="all, delete-orphan", order_by="Task.id"
    )


class Task(Base):
    __tablename__ = "tasks"
    __table_args__ = (
        ForeignKeyConstraint(
            ["tenant_id", "project_id"], ["projects.tenant_id", "projects.id"], ondelete="CASCADE"
        ),
    )

    tenant_id: Mapped[str] = mapped_column(String(63), primary_key=True, default=_tenant_id)
    id: Mapped[int] = mapped_column(Integer, ID_SEQUENCE, primary_key=True)
    project_id: Mapped[int] = mapped_column(Integer)
    title: Mapped[str] = mapped_column(Text)
    done: Mapped[bool] = mapped_column(Boolean, default=False)

    project: Mapped[Project] = relationship(back_populates="tasks")


class AuditEvent(Base):
    """Written by a background task, inside the tenant's scope, after the response."""

    __tablename__ = "audit_events"

    tenant_id: Mapped[str] = mapped_column(String(63), primary_key=True, default=_tenant_id)
    id: Mapped[int] = mapped_column(Integer, ID_SEQUENCE, primary_key=True)
    message: Mapped[str] = mapped_column(Text)


DEMO_ROWS = {
    "acme": (["Rocket skates", "Giant magnet"], ["Order parts", "Test on coyote", "Ship"]),
    "globex": (["Doomsday device", "Volcano lair"], ["Hire henchmen", "Buy lava", "Scheme"]),
}
