"""Fixtures of the audit tests: a database and an application role of each module's own.

The role is created per module (roles are server-wide), so a test that makes it a superuser or
gives it a search_path cannot leak into another module; the database is dropped first, the
role after it. Bad set-ups are built with plain SQL as the superuser, and fixes are applied
the same way, through asyncpg's simple protocol, so a fix of several statements runs as one.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from asgi_tenancy.operations import AuditReport, audit
from asgi_tenancy.sqlalchemy import RowLevelSecurity
from tests.conftest import PgDatabase, PgServer, create_database, drop_database

ROLE_PASSWORD = "audit-role-test"


@dataclass(frozen=True)
class AuditDatabase:
    """One module's database, its own application role, and helpers to change both."""

    db: PgDatabase
    role: str
    server: PgServer

    @property
    def name(self) -> str:
        return self.db.name

    def dsn(self, database: str | None = None) -> str:
        url = make_url(self.db.admin_url).set(drivername="postgresql")
        if database is not None:
            url = url.set(database=database)
        return url.render_as_string(hide_password=False)

    def role_url(self) -> str:
        url = make_url(self.db.admin_url).set(username=self.role, password=ROLE_PASSWORD)
        return url.render_as_string(hide_password=False)

    async def sql(self, *statements: str, database: str | None = None) -> None:
        """Run statements as the superuser, each on its own (autocommit)."""
        conn = await asyncpg.connect(self.dsn(database))
        try:
            for statement in statements:
                await conn.execute(statement)
        finally:
            await conn.close()

    def engine(self) -> AsyncEngine:
        return create_async_engine(self.db.admin_url, poolclass=NullPool)

    async def audit(self, **options: Any) -> AuditReport:
        """The audit of this database for this role, connected as the superuser."""
        engine = self.engine()
        try:
            return await audit(engine, app_role=self.role, **options)
        finally:
            await engine.dispose()


def _setup(server: PgServer, db: PgDatabase, role: str) -> AuditDatabase:
    audit_db = AuditDatabase(db, role, server)
    asyncio.run(
        audit_db.sql(
            f"CREATE ROLE {role} LOGIN NOSUPERUSER NOBYPASSRLS PASSWORD '{ROLE_PASSWORD}'",
            f'GRANT CONNECT ON DATABASE "{db.name}" TO {role}',
            f'REVOKE TEMPORARY ON DATABASE "{db.name}" FROM PUBLIC',
            f"GRANT USAGE ON SCHEMA public TO {role}",
            f"ALTER DEFAULT PRIVILEGES GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO {role}",
            f"ALTER DEFAULT PRIVILEGES GRANT USAGE, SELECT ON SEQUENCES TO {role}",
            RowLevelSecurity().function_ddl(),
        )
    )
    return audit_db


@pytest.fixture(scope="module")
def audit_db(pg_server: PgServer, request: pytest.FixtureRequest) -> Iterator[AuditDatabase]:
    label = request.module.__name__.rsplit(".", 1)[-1]
    role = f"audit_{uuid.uuid4().hex[:10]}"
    db = create_database(pg_server, label)
    try:
        yield _setup(pg_server, db, role)
    finally:
        drop_database(pg_server, db)
        cleanup = AuditDatabase(db, role, pg_server)
        asyncio.run(
            cleanup.sql(
                f"DROP OWNED BY {role}",
                f"DROP ROLE IF EXISTS {role}",
                database=pg_server.admin_url.database or "postgres",
            )
        )


def unique(prefix: str) -> str:
    """A fresh lower-case name, so tests of one module never share an object."""
    return f"{prefix}_{uuid.uuid4().hex[:8]}"
