"""Fixtures of the lifecycle tests: a registry database and provisioners built on it.

Schemas live in the module's own database, but databases and roles are cluster-wide: every
name the provisioners make here starts with a per-run prefix, and whatever a module leaves
behind is dropped with it.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import Column, Integer, MetaData, Table, Text, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from asgi_tenancy.operations import TenantProvisioner
from asgi_tenancy.sqlalchemy import SchemaPerTenant, create_tenants_table
from asgi_tenancy.sqlalchemy.strategy import IsolationStrategy
from tests.conftest import APP_ROLE, PgDatabase, PgServer, _admin_execute

RUN = f"pv{uuid.uuid4().hex[:6]}"  # prefix of every schema, role and database made here

metadata = MetaData()
notes = Table(
    "notes",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("body", Text, nullable=False),
)


async def _set_up(db: PgDatabase) -> None:
    engine = create_async_engine(db.admin_url)
    async with engine.begin() as conn:
        # SchemaPerTenant.validate() refuses an app role that may create temporary tables.
        await conn.execute(text(f'REVOKE TEMPORARY ON DATABASE "{db.name}" FROM PUBLIC'))
        await conn.execute(text(f'REVOKE TEMPORARY ON DATABASE "{db.name}" FROM {APP_ROLE}'))
        await SchemaPerTenant(metadata=metadata).create_shared_schema(conn, APP_ROLE)
    await create_tenants_table(engine)
    await engine.dispose()


async def _clean_up(server: PgServer, db: PgDatabase) -> None:
    engine = create_async_engine(server.url("postgres"), isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as conn:
            databases = await conn.scalars(
                text("SELECT datname FROM pg_database WHERE datname LIKE :p"), {"p": f"{RUN}%"}
            )
            for name in list(databases):
                await conn.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
            roles = await conn.scalars(
                text("SELECT rolname FROM pg_roles WHERE rolname LIKE :p"), {"p": f"{RUN}%"}
            )
            names = list(roles)
    finally:
        await engine.dispose()
    for name in names:  # their grants live in the module's database
        await _admin_execute(server, db.name, f'DROP OWNED BY "{name}"', f'DROP ROLE "{name}"')


@pytest.fixture(scope="module")
def lifecycle_database(pg_server: PgServer, pg_database: PgDatabase) -> Iterator[PgDatabase]:
    """The module's database with a tenants registry; tenant databases dropped afterwards."""
    asyncio.run(_set_up(pg_database))
    yield pg_database
    asyncio.run(_clean_up(pg_server, pg_database))


@pytest.fixture
def lifecycle_admin(lifecycle_database: PgDatabase, admin_engine: AsyncEngine) -> AsyncEngine:
    """The superuser engine, on a database whose registry is ready."""
    return admin_engine


Provision = Callable[..., TenantProvisioner]


@pytest.fixture
def provision(lifecycle_admin: AsyncEngine, lifecycle_database: PgDatabase) -> Provision:
    """``provision(strategy, **options)``: a provisioner as the admin, for the app role."""

    def make(strategy: IsolationStrategy, **options: Any) -> TenantProvisioner:
        options.setdefault("app_url", lifecycle_database.app_url)
        options.setdefault("database_naming", f"{RUN}_{{id}}")
        return TenantProvisioner(lifecycle_admin, strategy, app_role=APP_ROLE, **options)

    return make
