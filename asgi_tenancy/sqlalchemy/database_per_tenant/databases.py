"""Tenant databases on a PostgreSQL server, as the owner: where a URL points, what a server is,
and how a tenant database is made and removed (provisioning and moves build them alike)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from sqlalchemy import MetaData, text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from ..postgres import check_name, comment_sql, dml_grants, quote_ident

__all__ = ["IDENTITY_SQL", "autocommit", "build_database", "drop_database", "url_target"]

IDENTITY_SQL = (
    "SELECT current_database() AS db,"
    " (SELECT system_identifier FROM pg_control_system())::text AS server,"
    " (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) AS superuser,"
    " (SELECT oid = 10 FROM pg_roles WHERE rolname = current_user) AS bootstrap"
)


def url_target(url: URL) -> tuple[str, ...]:
    """Where a URL points (hosts, ports, database), compared before any SQL is sent."""
    hosts = url.query.get("host") or url.host or ""
    return (url.get_backend_name(), str(hosts).lower(), str(url.port or 5432), url.database or "")


async def build_database(
    server: AsyncEngine,
    name: str,
    tenant_id: str,
    grantee: str,
    metadata: MetaData | None,
    *,
    extra: Sequence[str] = (),
) -> None:
    """Make database ``name`` on ``server`` (an owner's engine on any of its databases) as
    provisioning does: the tenant's marker, ``CONNECT`` for ``grantee`` only, the tables of
    ``metadata`` (then ``extra`` DDL) owned by the owner, DML for ``grantee``. A step that
    fails removes the database again."""
    async with autocommit(server) as admin:
        await admin.execute(text(f"CREATE DATABASE {quote_ident(name)}"))
    try:
        async with autocommit(server) as admin:
            database, app = quote_ident(name), quote_ident(grantee)
            await admin.execute(text(comment_sql("database", name, tenant_id)))
            await admin.execute(
                text(f"REVOKE CONNECT, TEMPORARY ON DATABASE {database} FROM PUBLIC")
            )
            await admin.execute(text(f"GRANT CONNECT ON DATABASE {database} TO {app}"))
        await _create_tables(server.url.set(database=name), grantee, metadata, extra)
    except BaseException as exc:
        try:
            await drop_database(server, name)
        except Exception as cleanup:
            exc.add_note(f"asgi-tenancy: removing the database failed ({type(cleanup).__name__})")
        raise


async def _create_tables(
    url: URL, grantee: str, metadata: MetaData | None, extra: Sequence[str]
) -> None:
    """The tables of ``metadata``, owned by the admin role; the app role gets DML only."""
    engine = create_async_engine(url, poolclass=NullPool)
    schemas = {"public"}
    try:
        async with engine.begin() as conn:
            await conn.execute(text("REVOKE CREATE ON SCHEMA public FROM PUBLIC"))
            if metadata is not None:
                for table in metadata.tables.values():
                    if table.schema not in (None, "public"):
                        schema = check_name(table.schema, "table schema")
                        if schema not in schemas:
                            await conn.execute(
                                text(f"CREATE SCHEMA IF NOT EXISTS {quote_ident(schema)}")
                            )
                        schemas.add(schema)
                await conn.run_sync(metadata.create_all)
            for statement in extra:
                await conn.execute(text(statement))
            for schema in sorted(schemas):
                for statement in dml_grants(schema, grantee):
                    await conn.execute(text(statement))
    finally:
        await engine.dispose()


async def drop_database(server: AsyncEngine, name: str) -> None:
    """``DROP DATABASE ... WITH (FORCE)`` on ``server``: its sessions are ended first."""
    async with autocommit(server) as admin:
        await admin.execute(text(f"DROP DATABASE IF EXISTS {quote_ident(name)} WITH (FORCE)"))


@asynccontextmanager
async def autocommit(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A connection of ``engine`` outside any transaction (``CREATE``/``DROP DATABASE``)."""
    async with engine.connect() as conn:
        yield await conn.execution_options(isolation_level="AUTOCOMMIT")
