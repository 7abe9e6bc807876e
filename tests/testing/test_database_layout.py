"""The test kit with a database per tenant: a clone per tenant, each tenant placed in its own."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.engine import make_url

from asgi_tenancy import tenant_scope
from asgi_tenancy.errors import IsolationConfigError
from asgi_tenancy.sqlalchemy import DatabasePerTenant
from asgi_tenancy.testing import KitDatabases, KitServer, TenancyKit, TwoTenants
from tests.conftest import PgServer
from tests.testing.leaky import SETUPS, notes_base

pytest_plugins = ["asgi_tenancy.testing"]

SETUP = SETUPS["database_correct"]


@pytest.fixture(scope="session")
def tenancy_database_url(pg_server: PgServer) -> str:
    return pg_server.admin_url.render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def tenancy_kit() -> TenancyKit:
    return SETUP.kit


def test_a_strategy_placing_tenants_by_url_for_is_refused() -> None:
    with pytest.raises(IsolationConfigError, match="url_for"):
        TenancyKit(
            models=notes_base(tenant_column=False),
            strategy=lambda: DatabasePerTenant(url_for=lambda tenant: "postgresql://x/y"),
        )


def test_each_tenant_is_placed_in_a_database_of_its_own(tenancy: TwoTenants) -> None:
    urls = [make_url(t.attributes["database_url"]) for t in (tenancy.a, tenancy.b)]
    names = [url.database for url in urls]
    assert len({tenancy.name, *names}) == 3
    assert all(url.username == tenancy.app_role for url in urls)
    assert tenancy.databases == [tenancy.name, *names]


def test_each_database_holds_its_tenant_rows_only(tenancy: TwoTenants) -> None:
    (table,) = SETUP.kit.metadata.sorted_tables

    async def read() -> dict[str, list[str]]:
        found = {}
        for tenant in (tenancy.a, tenancy.b):
            async with tenancy.admin(tenant) as conn:
                found[tenant.id] = list(await conn.scalars(select(table.c.body)))
        async with tenancy.admin() as conn:  # the application's own database: no rows
            found["app"] = list(await conn.scalars(select(table.c.body)))
        return found

    found = asyncio.run(read())
    assert found == {
        "acme": ["acme-1", "acme-2", "acme-3"],
        "globex": ["globex-1", "globex-2", "globex-3"],
        "app": [],
    }


def test_the_fixtures_give_tenants_the_application_can_serve(
    tenancy: TwoTenants, tenant_a: object, tenant_b: object
) -> None:
    assert (tenant_a, tenant_b) == (tenancy.a, tenancy.b)
    model = SETUP.model

    async def count() -> list[int | None]:
        counts: list[int | None] = []
        async with tenancy.database() as database:
            for tenant in (tenancy.a, tenancy.b):
                async with tenant_scope(tenant), tenancy.session(database) as session:
                    counts.append(await session.scalar(select(func.count()).select_from(model)))
                    db = await session.scalar(text("SELECT current_database()"))
                    assert db == make_url(tenant.attributes["database_url"]).database
        return counts

    assert asyncio.run(count()) == [3, 3]


def test_close_drops_every_clone(pg_server: PgServer) -> None:
    server = KitServer(pg_server.admin_url)
    databases = KitDatabases(server)
    names = databases.prepare(SETUP.kit).databases
    databases.close()

    async def remaining() -> list[str]:
        engine = server.engine(server.maintenance)
        try:
            async with engine.connect() as conn:
                query = text("SELECT datname FROM pg_database WHERE datname = ANY(:n)")
                return list(await conn.scalars(query, {"n": names}))
        finally:
            await engine.dispose()

    assert len(names) == 3
    assert asyncio.run(remaining()) == []
