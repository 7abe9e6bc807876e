"""What every isolation strategy provides to ``TenantDatabase``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, ClassVar

from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import Session

from ..tenant import Tenant

if TYPE_CHECKING:
    from .database import TenantDatabase

__all__ = ["IsolationStrategy", "quote_ident", "quote_literal"]

_PREPARER = postgresql.dialect().identifier_preparer  # type: ignore[no-untyped-call]


def quote_ident(name: str) -> str:
    """A PostgreSQL identifier, quoted by SQLAlchemy's PostgreSQL rules where it must be."""
    quoted: str = _PREPARER.quote(name)
    return quoted


def quote_literal(value: str) -> str:
    """A PostgreSQL string literal; callers pass only values already validated."""
    if "\x00" in value:
        raise ValueError("NUL cannot appear in a PostgreSQL literal")
    return "'" + value.replace("'", "''") + "'"


class IsolationStrategy:
    """Base of the four strategies; each overrides the steps it needs."""

    name: ClassVar[str] = "base"

    def attach(self, database: TenantDatabase) -> None:
        """Called once by ``TenantDatabase.__init__``: check configuration, raise early."""

    def binding_sql(self, tenant: Tenant) -> str | None:
        """SQL that binds one transaction to ``tenant``; sent with every BEGIN."""
        return None

    #: Whether ``backend_binding_sql`` needs the server process id of the connection.
    binds_to_backend: bool = False

    def backend_binding_sql(self, tenant: Tenant, backend_pid: int) -> str | None:
        """The binding for one server connection; strategies that sign it override this."""
        return self.binding_sql(tenant)

    @asynccontextmanager
    async def engine_for(
        self, database: TenantDatabase, tenant: Tenant
    ) -> AsyncIterator[AsyncEngine]:
        """The engine a session of ``tenant`` uses, held for the session's lifetime."""
        yield database.engine

    def configure_session(self, session: Session, tenant: Tenant) -> None:
        """Per-session set-up (ORM criteria, insert stamping)."""

    async def validate(self, database: TenantDatabase) -> None:
        """Refuse to serve (``IsolationConfigError``) when isolation would not hold."""

    async def dispose(self) -> None:
        """Release what the strategy holds (engines of other databases)."""
