"""The Citus cluster every test here stands on: ``TENANCY_CITUS_URL`` (a superuser URL of the
coordinator, ``postgresql://postgres@127.0.0.1:9700/postgres`` from ``setup.sh``).

Unset, the tests skip with the reason; under ``CI`` that is a failure. On it, once per session:
``tenancy_citus_app`` (NOSUPERUSER, NOBYPASSRLS, owns nothing; Citus creates it on the workers
too), the row-mode tables distributed by ``tenant_id`` and seeded for two tenants whose keys
collide, and an admin engine for reading back what really happened.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from sqlalchemy import insert, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from asgi_tenancy.sqlalchemy import RowLevelSecurity, TenantDatabase
from tests.citus.models import SHARED, Base, seed_rows

APP_ROLE = "tenancy_citus_app"
NOT_SET = "TENANCY_CITUS_URL is not set: no Citus cluster (bash ../shared/citus/setup.sh)"


@dataclass(frozen=True)
class Cluster:
    """The coordinator, as a superuser (``admin_url``) and as the application role."""

    admin_url: str
    app_url: str
    app_role: str = APP_ROLE

    def url(self, role: str) -> str:
        return make_url(self.app_url).set(username=role).render_as_string(hide_password=False)

    @property
    def coordinator(self) -> str:
        """``host:port`` of the coordinator: a node that holds no shards (CI runs the cluster
        on ports of its own, so never assume 9700)."""
        url = make_url(self.admin_url)
        return f"{url.host}:{url.port or 5432}"

    @property
    def coordinator_port(self) -> int:
        return int(self.coordinator.rsplit(":", 1)[1])


def citus_url() -> str:
    url = os.environ.get("TENANCY_CITUS_URL")
    if not url:
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail(NOT_SET + " (CI must start it: see .ci/run)")
        pytest.skip(NOT_SET)
    return url


async def admin_sql(url: str, *statements: str) -> None:
    engine = create_async_engine(url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    try:
        async with engine.connect() as conn:
            for statement in statements:
                await conn.execute(text(statement))
    finally:
        await engine.dispose()


def row_strategy() -> RowLevelSecurity:
    return RowLevelSecurity(metadata=Base.metadata, shared_tables=SHARED, citus=True)


async def _set_up(admin_url: str) -> None:
    tables = ", ".join(t.name for t in Base.metadata.sorted_tables)
    await admin_sql(
        admin_url,
        f"DROP TABLE IF EXISTS {tables} CASCADE",
        f"""DO $$ BEGIN
          IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{APP_ROLE}') THEN
            CREATE ROLE {APP_ROLE} LOGIN;
          END IF;
        END $$""",
        f"ALTER ROLE {APP_ROLE} LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE",
        # Temporary objects outlive a transaction on a pooled connection (R018).
        "REVOKE TEMPORARY ON DATABASE postgres FROM PUBLIC",
        f"GRANT USAGE ON SCHEMA public TO {APP_ROLE}",
    )
    engine = create_async_engine(admin_url, poolclass=NullPool)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
        async with engine.begin() as conn:
            await row_strategy().install(conn)
            await conn.execute(
                text(f"GRANT SELECT, INSERT, UPDATE, DELETE ON {tables} TO {APP_ROLE}")
            )
        async with engine.begin() as conn:
            for name, rows in seed_rows().items():
                await conn.execute(insert(Base.metadata.tables[name]), rows)
    finally:
        await engine.dispose()


@pytest.fixture(scope="session")
def cluster() -> Cluster:
    url = make_url(citus_url()).set(drivername="postgresql+asyncpg")
    admin_url = url.render_as_string(hide_password=False)
    app_url = url.set(username=APP_ROLE, password=None).render_as_string(hide_password=False)
    asyncio.run(_set_up(admin_url))
    return Cluster(admin_url, app_url)


@pytest.fixture
async def admin(cluster: Cluster) -> AsyncIterator[AsyncEngine]:
    """A superuser engine on the coordinator: what the tests assert through."""
    engine = create_async_engine(cluster.admin_url, poolclass=NullPool)
    yield engine
    await engine.dispose()


@pytest.fixture
async def db(cluster: Cluster) -> AsyncIterator[TenantDatabase]:
    """Row tenancy on the cluster as the application role; one pooled connection, so every
    test also exercises a connection passed from tenant to tenant."""
    database = TenantDatabase(
        cluster.app_url, row_strategy(), engine_options={"pool_size": 1, "max_overflow": 0}
    )
    await database.validate()
    yield database
    await database.dispose()
