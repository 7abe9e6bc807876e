"""SchemaPerTenant(hardened=True): injected SQL over a shared pool cannot reach another schema.

acme's session runs raw SQL that names globex's schema, moves the search path, or rewrites the
binding; globex's rows are read back as the admin before and after. The same attacks on the
plain schema mode show the hole the hardened mode closes (documented, not hidden).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import create_async_engine

from asgi_tenancy import tenant_scope
from asgi_tenancy.errors import TenantPlacementError
from asgi_tenancy.sqlalchemy import TenantDatabase
from tests.adversarial.deployments import ROWS, Deployment, deployed
from tests.conftest import PgServer

READS = [
    "SELECT body FROM tenant_globex.items",
    'SELECT body FROM "tenant_globex"."items"',
    "SELECT body FROM (SELECT * FROM tenant_globex.items) s",
    "WITH g AS (SELECT * FROM tenant_globex.items) SELECT body FROM g",
    "SELECT body FROM items UNION ALL SELECT body FROM tenant_globex.items",
    "SELECT g.body FROM items a JOIN tenant_globex.items g ON g.id = a.id",
]
PATHS = [
    "SET LOCAL search_path TO tenant_globex",
    "SELECT set_config('search_path', 'tenant_globex', true)",
    "SET search_path = tenant_globex, public",
]
WRITES = [
    "INSERT INTO tenant_globex.items (id, body) VALUES (900, 'acme-forged')",
    "UPDATE tenant_globex.items SET body = 'acme-was-here'",
    "DELETE FROM tenant_globex.items",
    "INSERT INTO tenant_globex.items SELECT 901, 'acme-copied' FROM items LIMIT 1",
]
REBIND = [
    "SELECT set_config('app.tenant_id', 'globex', true)",
    "SELECT set_config('app.tenant_id', 'globex:' || repeat('0', 64), true)",
    "RESET app.tenant_id",
]


@pytest.fixture(scope="module", params=["schema", "schema-hardened"])
def deployment(pg_server: PgServer, request: pytest.FixtureRequest) -> Iterator[Deployment]:
    yield from deployed(pg_server, request.param)


@pytest.fixture
async def database(deployment: Deployment) -> AsyncIterator[TenantDatabase]:
    db = deployment.make()
    await db.validate()
    yield db
    await db.dispose()


async def _globex(deployment: Deployment) -> list[tuple[int, str]]:
    engine = create_async_engine(deployment.admin_urls["globex"])
    try:
        async with engine.connect() as conn:
            rows = await conn.execute(text("SELECT id, body FROM tenant_globex.items ORDER BY id"))
            return [(row.id, row.body) for row in rows]
    finally:
        await engine.dispose()


async def _as_acme(db: TenantDatabase, deployment: Deployment, *statements: str) -> list[str]:
    """acme runs ``statements`` and commits; the bodies the last one returned (or raised)."""
    async with tenant_scope(deployment.tenants["acme"]), db.session() as s:
        result = None
        for statement in statements:
            result = await s.execute(text(statement))
        bodies = list(result.scalars()) if result is not None and result.returns_rows else []
        await s.commit()
        return bodies


async def _outcome(db: TenantDatabase, deployment: Deployment, *statements: str) -> list[str]:
    try:
        return await _as_acme(db, deployment, *statements)
    except DBAPIError:
        return []  # refused by the server: nothing read, nothing written


@pytest.mark.parametrize("read", READS)
async def test_another_schemas_rows_are_never_read(
    database: TenantDatabase, deployment: Deployment, read: str
) -> None:
    bodies = await _outcome(database, deployment, read)
    leaked = [b for b in bodies if b.startswith("globex-")]
    if deployment.kind == "schema-hardened":
        assert leaked == []
    else:
        assert leaked  # the plain mode holds against mistakes only: the documented hole


@pytest.mark.parametrize("path", PATHS)
async def test_a_moved_search_path_reads_nothing_of_another_tenant(
    database: TenantDatabase, deployment: Deployment, path: str
) -> None:
    bodies = await _outcome(database, deployment, path, "SELECT body FROM items")
    leaked = [b for b in bodies if b.startswith("globex-")]
    assert (leaked == []) is (deployment.kind == "schema-hardened")


@pytest.mark.parametrize("write", WRITES)
async def test_another_schemas_rows_are_never_written(
    database: TenantDatabase, deployment: Deployment, write: str
) -> None:
    before = await _globex(deployment)
    await _outcome(database, deployment, write)
    after = await _globex(deployment)
    if deployment.kind == "schema-hardened":
        assert after == before
    else:
        assert after != before  # the documented hole
        engine = create_async_engine(deployment.admin_urls["globex"])
        async with engine.begin() as conn:  # put globex back for the next case
            await conn.execute(text("DELETE FROM tenant_globex.items"))
            await conn.execute(
                text(
                    "INSERT INTO tenant_globex.items SELECT i, 'globex-item-' || i"
                    f" FROM generate_series(1, {ROWS}) i"
                )
            )
        await engine.dispose()


@pytest.mark.parametrize("rebind", REBIND)
async def test_a_rewritten_binding_opens_nothing(
    database: TenantDatabase, deployment: Deployment, rebind: str
) -> None:
    bodies = await _outcome(database, deployment, rebind, READS[0])
    leaked = [b for b in bodies if b.startswith("globex-")]
    # Plain: the setting binds nothing, the qualified name is the hole; hardened: refused.
    assert (leaked == []) is (deployment.kind == "schema-hardened")


async def test_the_tenants_own_rows_are_served(
    database: TenantDatabase, deployment: Deployment
) -> None:
    bodies = await _as_acme(database, deployment, "SELECT body FROM items ORDER BY id")
    assert bodies == [f"acme-item-{i}" for i in range(1, ROWS + 1)]


async def test_a_table_without_the_policy_is_refused_before_serving(
    database: TenantDatabase, deployment: Deployment
) -> None:
    engine = create_async_engine(deployment.admin_urls["acme"])
    try:
        async with engine.begin() as conn:
            await conn.execute(text("CREATE TABLE tenant_acme.extra (id int)"))
        fresh = deployment.make()  # a process whose catalogue check has not run yet
        await fresh.validate()
        try:
            if deployment.kind == "schema-hardened":
                with pytest.raises(TenantPlacementError) as refused:
                    await _as_acme(fresh, deployment, "SELECT 1")
                assert refused.value.check == "A013"
            else:  # no policy to miss: the plain mode serves as before
                assert await _as_acme(fresh, deployment, "SELECT 'served'") == ["served"]
        finally:
            await fresh.dispose()
    finally:
        async with engine.begin() as conn:
            await conn.execute(text("DROP TABLE tenant_acme.extra"))
        await engine.dispose()
