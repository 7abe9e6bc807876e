"""The kit's PostgreSQL: a superuser URL, the app role, one template database per kit.

A template is built once (tables, the strategy's DDL, both tenants' rows) under a name derived
from everything it is built from, so a server that outlives the test session (CI's, a
developer's) serves the next session a clone without rebuilding it. Each session clones it once
(``CREATE DATABASE ... TEMPLATE``; with a database per tenant, once per tenant and once for the
application, and each tenant's clone gets its own rows); each test only puts the rows back.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import insert, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from ..errors import IsolationConfigError
from ..sqlalchemy.postgres import quote_ident, quote_literal
from .kit import TenancyKit

__all__ = ["KitServer", "local_server", "seed"]

_APP_PASSWORD = "tenancy-kit-test"


class KitServer:
    """A PostgreSQL reached as a superuser: the kit creates roles and databases on it."""

    def __init__(self, admin_url: URL | str) -> None:
        self.admin_url = make_url(admin_url).set(drivername="postgresql+asyncpg")
        self.maintenance = self.admin_url.database or "postgres"

    def __repr__(self) -> str:
        return f"KitServer({self.admin_url.render_as_string(hide_password=True)!r})"

    def url(self, database: str, role: str | None = None) -> str:
        """The database's URL as the superuser, or as ``role`` (the kit's app role)."""
        url = self.admin_url.set(database=database)
        if role is not None:
            url = url.set(username=role, password=_APP_PASSWORD)
        return url.render_as_string(hide_password=False)

    def engine(self, database: str, *, autocommit: bool = False) -> AsyncEngine:
        options = {"isolation_level": "AUTOCOMMIT"} if autocommit else {}
        return create_async_engine(self.url(database), **options)

    async def execute(self, database: str, *statements: str) -> None:
        engine = self.engine(database, autocommit=True)
        try:
            async with engine.connect() as conn:
                for statement in statements:
                    await conn.execute(text(statement))
        finally:
            await engine.dispose()

    async def ensure_role(self, role: str) -> None:
        """The app role: a login that is not superuser, not BYPASSRLS, creates nothing."""
        name = quote_ident(role)
        await self.execute(
            self.maintenance,
            "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = "
            f"{quote_literal(role)}) THEN CREATE ROLE {name} LOGIN; END IF; END $$",
            f"ALTER ROLE {name} LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE "
            f"PASSWORD {quote_literal(_APP_PASSWORD)}",
        )

    async def template(self, kit: TenancyKit) -> str:
        """The kit's template database, built unless a finished one is already there."""
        fingerprint = kit.fingerprint()
        name = f"kit_tpl_{kit.name}_{fingerprint}"[:63]
        lock = int(hashlib.sha256(name.encode()).hexdigest()[:15], 16)
        maintenance = self.engine(self.maintenance, autocommit=True)
        try:
            async with maintenance.connect() as conn:
                # One builder at a time (pytest-xdist workers share the server).
                await conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": lock})
                try:
                    if not await _database_exists(conn, name):
                        await self._build(conn, kit, name)
                finally:
                    await conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": lock})
        finally:
            await maintenance.dispose()
        return name

    async def _build(self, conn: AsyncConnection, kit: TenancyKit, name: str) -> None:
        building = f"kit_build_{uuid.uuid4().hex[:12]}"
        await conn.execute(text(f"CREATE DATABASE {quote_ident(building)}"))
        try:
            engine = self.engine(building)
            try:
                async with engine.begin() as admin:
                    strategy = kit.strategy()
                    if kit.provision is not None:
                        await kit.provision(admin, strategy, kit.tenants, kit.app_role)
                    else:
                        await kit.layout.provision(admin, strategy, kit)
                    if not kit.layout.per_tenant_database:  # else: each clone its tenant's
                        await seed(admin, kit)
                async with engine.connect() as admin:
                    await check_app_role(admin, kit.app_role)
            finally:
                await engine.dispose()
            await conn.execute(
                text(f"ALTER DATABASE {quote_ident(building)} RENAME TO {quote_ident(name)}")
            )
        except BaseException:
            await conn.execute(text(f"DROP DATABASE IF EXISTS {quote_ident(building)}"))
            raise

    async def clone(self, template: str, role: str) -> str:
        """A database of this session's own, copied from ``template``."""
        name = f"kit_{uuid.uuid4().hex[:12]}"
        await self.execute(
            self.maintenance,
            f"CREATE DATABASE {quote_ident(name)} TEMPLATE {quote_ident(template)}",
            # Database privileges live in the shared catalog: a copy does not inherit them.
            f"REVOKE TEMPORARY ON DATABASE {quote_ident(name)} FROM PUBLIC",
            f"GRANT CONNECT ON DATABASE {quote_ident(name)} TO {quote_ident(role)}",
            # A commit need not wait for the disk: a crash loses a throwaway database anyway.
            f"ALTER DATABASE {quote_ident(name)} SET synchronous_commit = off",
        )
        return name

    async def drop(self, database: str) -> None:
        await self.execute(
            self.maintenance, f"DROP DATABASE IF EXISTS {quote_ident(database)} WITH (FORCE)"
        )


async def seed(conn: AsyncConnection, kit: TenancyKit, only: int | None = None) -> None:
    """Both tenants' rows (and the shared tables' rows), inserted as the owner; ``only``: the
    rows of that tenant alone (a database of its own)."""
    for table in kit.metadata.sorted_tables:
        for owner in kit.layout.owners(kit, table):
            if only is not None and owner != only:
                continue
            tenant = None if owner is None else kit.tenants[owner]
            options = kit.layout.options(tenant)
            await conn.execute(
                insert(table), kit.rows.rows(table, owner), execution_options=options
            )


async def check_app_role(conn: AsyncConnection, role: str) -> None:
    """Refuse to test as a role that would see through isolation: the results would lie."""
    row = (
        await conn.execute(
            text(
                "SELECT r.rolsuper, r.rolbypassrls, (SELECT count(*) FROM pg_class c"
                " WHERE c.relowner = r.oid) AS owned FROM pg_roles r WHERE r.rolname = :r"
            ),
            {"r": role},
        )
    ).one()
    if row.rolsuper or row.rolbypassrls or row.owned:
        raise IsolationConfigError(
            "the test kit's app role is superuser, BYPASSRLS or owns tables",
            hint="give the kit a role of its own (TenancyKit(app_role=...))",
        )


async def _database_exists(conn: AsyncConnection, name: str) -> bool:
    found = await conn.scalar(text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name})
    return found is not None


@contextmanager
def local_server() -> Iterator[URL]:
    """A throwaway PostgreSQL from the ``pgserver`` wheel, in a temporary folder."""
    try:
        import pgserver
    except ImportError as exc:
        raise IsolationConfigError(
            "no database for the test kit",
            hint="set TENANCY_TEST_DATABASE_URL to a superuser URL, or pip install pgserver",
        ) from exc
    datadir = tempfile.mkdtemp(prefix="tenancy-kit-pg-")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns about XDG_RUNTIME_DIR as root
        server = pgserver.get_server(datadir, cleanup_mode="stop")  # type: ignore[attr-defined]
    try:
        yield make_url(server.get_uri())
    finally:
        server.cleanup()
        shutil.rmtree(datadir, ignore_errors=True)
