"""Per strategy: GET /items/{id} through TenancyMiddleware + tenant_session, against the same
endpoint in plain FastAPI with an unscoped AsyncSession.

- row, row_signed: RowLevelSecurity on a shared table; the baseline reads a copy of it with no
  policy, filtering the tenant by hand.
- query: QueryScoping on the same shared table through an ORM class; the baseline reads the copy
  through an ORM class, filtering the tenant by hand.
- schema, schema_hardened: SchemaPerTenant, one schema per tenant (hardened: a signed policy
  on every tenant table); the baseline reads the same rows from one plain unscoped table in
  ``public``, filtering the tenant by hand.
- database: DatabasePerTenant, one database per tenant; the baseline is an unscoped session on
  one of those databases (no filter: nothing else lives there).

Requests are in-process ASGI calls, interleaved rounds (the harshest view: no HTTP client or
server in the loop); round trips per request are counted on the wire through a loopback proxy
in a separate pass. Then ``over_http``: the same two apps served by uvicorn (one worker each,
subprocesses) and called with httpx keep-alive, interleaved rounds, the ratio a client sees.
Prints one JSON object; targets (issue 16): ratio >= 0.97 for row and schema, >= 0.95 for
row_signed, schema_hardened and database, >= 0.90 for query, and no round trip beyond the
baseline's three.
``python -m benchmarks.strategies [row row_signed query schema schema_hardened database]``.
"""

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any

import httpx
from fastapi import Depends, FastAPI, HTTPException, Request
from sqlalchemy import Column, Integer, MetaData, String, Table, insert, select, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import registry
from sqlalchemy.sql import Select

from asgi_tenancy import (
    CachedTenantStore,
    HeaderResolver,
    InMemoryTenantStore,
    TenancyMiddleware,
    Tenant,
)
from asgi_tenancy.fastapi import setup_tenancy, tenant_session
from asgi_tenancy.sqlalchemy import (
    DatabasePerTenant,
    IsolationStrategy,
    QueryScoping,
    RowLevelSecurity,
    SchemaPerTenant,
    TenantDatabase,
)
from asgi_tenancy.sqlalchemy.hygiene import SESSION_LOCKS
from benchmarks.common import (
    APP_ROLE,
    asgi_call,
    compare_over_http,
    create_app_role,
    http_scope,
    machine,
    paired_figures,
    paired_rounds,
    peak_rss_mb,
    postgres,
    round_trips,
    uvicorn_app,
)
from benchmarks.wire import WireProxy

# 5 strategies x (warm-up + ROUNDS x REQUESTS x 2 contenders + counted pass) must fit in ~90 s.
# Short rounds: the two sides of a pair run within 40 ms of each other, so drift cancels.
ROUNDS, REQUESTS, WARM_UP, COUNTED = 150, 15, 200, 200
HTTP_ROUNDS, HTTP_REQUESTS = 110, 30
# Requests read ids 1..ITEMS; each tenant has ROWS rows, analyzed once loaded: the planner
# picks the primary-key index scan a real table gets, and no autovacuum ANALYZE half-way
# through a run changes a plan (on 200 unanalyzed rows it flipped to a sequential scan).
ITEMS, ROWS, TENANTS = 100, 5_000, ("acme", "globex")

# Shared tables (row, row_signed, query): both tenants' rows in one table, ids colliding.
metadata = MetaData()
items = Table(
    "items",
    metadata,
    Column("tenant_id", String(63), primary_key=True),
    Column("id", Integer, primary_key=True),
    Column("name", String),
)
plain_metadata = MetaData()
plain_items = items.to_metadata(plain_metadata, name="items_plain")

# QueryScoping confines ORM statements only: its own Table objects, mapped to classes.
query_metadata = MetaData()
query_items = items.to_metadata(query_metadata)
query_plain_items = items.to_metadata(MetaData(), name="items_plain")


class Item:
    id: int
    name: str


class PlainItem:
    tenant_id: str
    id: int
    name: str


_mapper = registry()
_mapper.map_imperatively(Item, query_items)
_mapper.map_imperatively(PlainItem, query_plain_items)

# Schema and database per tenant: the tenant's own table, no tenant column.
own_metadata = MetaData()
own_items = Table(
    "items",
    own_metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("name", String),
)

SIGNING_KEY = "benchmark-signing-key-0123456789abcdef"
TARGETS = {
    "row": 0.97,
    "schema": 0.97,
    "row_signed": 0.95,
    "schema_hardened": 0.95,
    "database": 0.95,
    "query": 0.90,
}
DATABASES = {t: f"bench_tenant_{t}" for t in TENANTS}

ScopedQuery = Callable[[int], Select[Any]]
BaselineQuery = Callable[[str, int], Select[Any]]


def _plain_tenants(url: URL) -> list[Tenant]:
    return [Tenant(t) for t in TENANTS]


def _same_url(url: URL) -> URL:
    return url


@dataclass(frozen=True)
class Setup:
    """One contender: a fresh strategy per TenantDatabase, and both endpoints' statements."""

    strategy: Callable[[], IsolationStrategy]
    scoped: ScopedQuery
    baseline: BaselineQuery
    tenants: Callable[[URL], list[Tenant]] = _plain_tenants  # given the app URL in use
    baseline_url: Callable[[URL], URL] = _same_url
    teardown: Callable[[URL], Awaitable[None]] | None = field(default=None)


def item_scope(tenant: str, item: int) -> dict[str, Any]:
    return http_scope(f"/items/{item}", tenant)


def baseline_app(engine: AsyncEngine, statement: BaselineQuery) -> FastAPI:
    """What a team writes by hand: read the header, filter every query on it."""
    app = FastAPI()

    async def session() -> AsyncIterator[AsyncSession]:
        async with AsyncSession(engine, expire_on_commit=False) as s:
            yield s

    @app.get("/items/{item_id}")
    async def get_item(
        item_id: int, request: Request, s: Annotated[AsyncSession, Depends(session)]
    ) -> dict[str, Any]:
        tenant = request.headers["x-tenant-id"]
        row = (await s.execute(statement(tenant, item_id))).one_or_none()
        if row is None:
            raise HTTPException(404)
        return {"id": row.id, "name": row.name}

    return app


def scoped_app(database: TenantDatabase, statement: ScopedQuery, tenants: list[Tenant]) -> FastAPI:
    app = FastAPI()
    store = CachedTenantStore(InMemoryTenantStore(tenants))
    app.add_middleware(TenancyMiddleware, resolvers=[HeaderResolver()], store=store)
    setup_tenancy(app, database=database)

    @app.get("/items/{item_id}")
    async def get_item(
        item_id: int, s: Annotated[AsyncSession, Depends(tenant_session)]
    ) -> dict[str, Any]:
        row = (await s.execute(statement(item_id))).one_or_none()
        if row is None:
            raise HTTPException(404)
        return {"id": row.id, "name": row.name}

    return app


def _rows(*, tenant_column: bool = True, tenant: str | None = None) -> list[dict[str, Any]]:
    return [
        {**({"tenant_id": t} if tenant_column else {}), "id": i, "name": f"{t}-{i}"}
        for t in ((tenant,) if tenant else TENANTS)
        for i in range(1, ROWS + 1)
    ]


# -- row (RLS) and query scoping: one shared table ---------------------------------------------


async def _create_shared_tables(admin_url: URL, strategy: RowLevelSecurity | None = None) -> None:
    admin = create_async_engine(admin_url)
    async with admin.begin() as conn:
        await conn.execute(text("DROP TABLE IF EXISTS items, items_plain CASCADE"))
        await _recommended_grants(conn, admin_url)  # validate(): R018
        await conn.run_sync(metadata.create_all)
        await conn.run_sync(plain_metadata.create_all)
        if strategy is not None:
            await strategy.install(conn)
        await conn.execute(insert(items), _rows())
        await conn.execute(insert(plain_items), _rows())
        await conn.execute(text("ANALYZE items, items_plain"))
    await admin.dispose()


def _row_strategy(signed: bool) -> Callable[[], IsolationStrategy]:
    def make() -> IsolationStrategy:
        return RowLevelSecurity(
            metadata=metadata,
            shared_tables={"items_plain"},
            signed=signed,
            signing_keys=[SIGNING_KEY] if signed else (),
        )

    return make


def _hand_filtered(tenant: str, item: int) -> Select[Any]:
    return select(plain_items).where(plain_items.c.tenant_id == tenant, plain_items.c.id == item)


def _row(signed: bool = False) -> Setup:
    return Setup(
        strategy=_row_strategy(signed),
        scoped=lambda item: select(items).where(items.c.id == item),
        baseline=_hand_filtered,
    )


async def _set_up_row(admin_url: URL, *, signed: bool = False) -> Setup:
    setup = _row(signed)
    strategy = setup.strategy()
    assert isinstance(strategy, RowLevelSecurity)
    await _create_shared_tables(admin_url, strategy)
    return setup


async def _set_up_row_signed(admin_url: URL) -> Setup:
    return await _set_up_row(admin_url, signed=True)


def _query() -> Setup:
    return Setup(
        strategy=lambda: QueryScoping(metadata=query_metadata),
        scoped=lambda item: select(Item.id, Item.name).where(Item.id == item),
        baseline=lambda tenant, item: select(PlainItem.id, PlainItem.name).where(
            PlainItem.tenant_id == tenant, PlainItem.id == item
        ),
    )


async def _set_up_query(admin_url: URL) -> Setup:
    await _create_shared_tables(admin_url)  # no policy: the ORM alone confines
    return _query()


async def _recommended_grants(conn: Any, admin_url: URL) -> None:
    """The recommended grants: no temporary objects (validate(): R018, S005) and, unless
    ``BENCH_SESSION_LOCKS=granted``, no session advisory locks (docs/security.md), which spares
    each change of tenant the release statement."""
    await conn.execute(
        text(f'REVOKE TEMPORARY ON DATABASE "{admin_url.database}" FROM PUBLIC, {APP_ROLE}')
    )
    verb = "GRANT" if os.environ.get("BENCH_SESSION_LOCKS") == "granted" else "REVOKE"
    direction = "TO" if verb == "GRANT" else "FROM"
    functions = (
        await conn.execute(
            text("SELECT oid::regprocedure::text FROM pg_proc WHERE proname = ANY(:names)"),
            {"names": list(SESSION_LOCKS)},
        )
    ).scalars()
    for function in functions:
        await conn.execute(text(f"{verb} EXECUTE ON FUNCTION {function} {direction} PUBLIC"))


# -- schema per tenant --------------------------------------------------------------------------


def _schema_strategy() -> SchemaPerTenant:
    return SchemaPerTenant(metadata=own_metadata)


def _hardened_strategy() -> SchemaPerTenant:
    return SchemaPerTenant(metadata=own_metadata, hardened=True, signing_keys=[SIGNING_KEY])


async def _drop_tenant_schemas(url: URL) -> None:
    engine = create_async_engine(url)
    async with engine.begin() as conn:
        for t in TENANTS:
            await conn.execute(text(f'DROP SCHEMA IF EXISTS "tenant_{t}" CASCADE'))
    await engine.dispose()


def _schema(hardened: bool = False) -> Setup:
    return Setup(
        strategy=_hardened_strategy if hardened else _schema_strategy,
        scoped=lambda item: select(own_items).where(own_items.c.id == item),
        baseline=_hand_filtered,
        teardown=_drop_tenant_schemas,
    )


async def _set_up_schema(admin_url: URL, *, hardened: bool = False) -> Setup:
    setup = _schema(hardened)
    strategy = setup.strategy()
    assert isinstance(strategy, SchemaPerTenant)
    admin = create_async_engine(admin_url)
    async with admin.begin() as conn:
        # validate(): no tenant table name in public (S002, S003), no temporary tables (S005).
        await conn.execute(text("DROP TABLE IF EXISTS items, items_plain CASCADE"))
        await _recommended_grants(conn, admin_url)
        if hardened:  # the signed binding's functions live in the shared schema
            await conn.execute(text("CREATE SCHEMA IF NOT EXISTS shared"))
            await conn.execute(text(f"GRANT USAGE ON SCHEMA shared TO {APP_ROLE}"))
            await strategy.install(conn)
        await conn.run_sync(plain_metadata.create_all)
        await conn.execute(insert(plain_items), _rows())
        for t in TENANTS:
            schema = strategy.schema_for(Tenant(t))
            await conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
            await strategy.create_tenant_schema(conn, Tenant(t), APP_ROLE)
            qualified = own_items.to_metadata(MetaData(), schema=schema)
            await conn.execute(insert(qualified), _rows(tenant_column=False, tenant=t))
            await conn.execute(text(f'ANALYZE "{schema}".items'))
        await conn.execute(text("ANALYZE items_plain"))
    await admin.dispose()
    return setup


async def _set_up_schema_hardened(admin_url: URL) -> Setup:
    return await _set_up_schema(admin_url, hardened=True)


# -- database per tenant ------------------------------------------------------------------------


def _database_tenants(url: URL) -> list[Tenant]:
    return [
        Tenant(
            t,
            attributes={
                "database_url": url.set(database=DATABASES[t]).render_as_string(hide_password=False)
            },
        )
        for t in TENANTS
    ]


async def _drop_databases(admin_url: URL) -> None:
    engine = create_async_engine(admin_url, isolation_level="AUTOCOMMIT")
    async with engine.connect() as conn:
        for name in DATABASES.values():
            await conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    await engine.dispose()


async def _set_up_database(admin_url: URL) -> Setup:
    await _drop_databases(admin_url)
    engine = create_async_engine(admin_url, isolation_level="AUTOCOMMIT")
    async with engine.connect() as conn:
        for name in DATABASES.values():
            await conn.execute(text(f'CREATE DATABASE "{name}"'))
    await engine.dispose()
    for t, name in DATABASES.items():
        tenant_admin = create_async_engine(admin_url.set(database=name))
        async with tenant_admin.begin() as conn:
            await conn.run_sync(own_metadata.create_all)
            await conn.execute(text(f"GRANT SELECT, INSERT, UPDATE, DELETE ON items TO {APP_ROLE}"))
            await conn.execute(insert(own_items), _rows(tenant_column=False, tenant=t))
            await conn.execute(text("ANALYZE items"))
        await tenant_admin.dispose()
    return _database()


def _database() -> Setup:
    return Setup(
        strategy=DatabasePerTenant,
        scoped=lambda item: select(own_items).where(own_items.c.id == item),
        baseline=lambda tenant, item: select(own_items).where(own_items.c.id == item),
        tenants=_database_tenants,
        baseline_url=lambda url: url.set(database=DATABASES[TENANTS[0]]),
        teardown=_drop_databases,
    )


#: Each contender without the database work: what a uvicorn subprocess builds its app from.
DESCRIBED: dict[str, Callable[[], Setup]] = {
    "row": _row,
    "row_signed": lambda: _row(signed=True),
    "query": _query,
    "schema": _schema,
    "schema_hardened": lambda: _schema(hardened=True),
    "database": _database,
}

SETUPS: dict[str, Callable[[URL], Awaitable[Setup]]] = {
    "row": _set_up_row,
    "row_signed": _set_up_row_signed,
    "query": _set_up_query,
    "schema": _set_up_schema,
    "schema_hardened": _set_up_schema_hardened,
    "database": _set_up_database,
}


@asynccontextmanager
async def _served(app: FastAPI) -> AsyncIterator[FastAPI]:
    async with app.router.lifespan_context(app):
        yield app


async def _requests(app: FastAPI, n: int) -> None:
    for i in range(n):
        status = await asgi_call(app, item_scope(TENANTS[i % 2], (i % ITEMS) + 1))
        assert status == 200, status


def http_app() -> FastAPI:
    """For ``uvicorn --factory``: one side (``BENCH_SIDE``: baseline or scoped) of one
    strategy's contest (``BENCH_STRATEGY``), on the app role's ``BENCH_APP_URL``."""
    setup = DESCRIBED[os.environ["BENCH_STRATEGY"]]()
    url = make_url(os.environ["BENCH_APP_URL"])
    if os.environ["BENCH_SIDE"] == "baseline":
        return baseline_app(create_async_engine(setup.baseline_url(url)), setup.baseline)
    return scoped_app(TenantDatabase(url, setup.strategy()), setup.scoped, setup.tenants(url))


def _http_calls(client: httpx.AsyncClient) -> Callable[[], Awaitable[None]]:
    async def go() -> None:
        for i in range(HTTP_REQUESTS):
            tenant = {"x-tenant-id": TENANTS[i % 2]}
            response = await client.get(f"/items/{(i % ITEMS) + 1}", headers=tenant)
            assert response.status_code == 200, response.status_code

    return go


async def _over_http(name: str, app_url: URL) -> dict[str, object]:
    """The same two apps served by uvicorn (a subprocess each), called with httpx keep-alive."""
    env = {"BENCH_STRATEGY": name, "BENCH_APP_URL": app_url.render_as_string(hide_password=False)}
    probe = {"x-tenant-id": TENANTS[0]}
    factory = "benchmarks.strategies:http_app"
    with (
        uvicorn_app(factory, "/items/1", probe, {**env, "BENCH_SIDE": "baseline"}) as plain,
        uvicorn_app(factory, "/items/1", probe, {**env, "BENCH_SIDE": "scoped"}) as scoped,
    ):
        return await compare_over_http(plain, scoped, _http_calls, HTTP_ROUNDS, HTTP_REQUESTS)


def _apps(setup: Setup, url: URL) -> tuple[AsyncEngine, FastAPI, FastAPI]:
    engine = create_async_engine(setup.baseline_url(url))
    database = TenantDatabase(url, setup.strategy())
    return (
        engine,
        baseline_app(engine, setup.baseline),
        scoped_app(database, setup.scoped, setup.tenants(url)),
    )


async def measure(name: str, admin_url: URL, app_url: URL) -> dict[str, object]:
    setup = await SETUPS[name](admin_url)
    try:
        baseline_engine, plain, scoped = _apps(setup, app_url)
        async with _served(scoped):
            times = await paired_rounds(
                plain, scoped, _requests, rounds=ROUNDS, per_round=REQUESTS, warm_up=WARM_UP
            )
        await baseline_engine.dispose()

        async with WireProxy(**_target(app_url)) as proxy:
            proxied = app_url.set(host="127.0.0.1", port=proxy.port, query={})
            counted_engine, counted_plain, counted_scoped = _apps(setup, proxied)
            apps = {"baseline": counted_plain, "scoped": counted_scoped}
            trips = await round_trips(proxy.counter, apps, _requests, _served, COUNTED)
            await counted_engine.dispose()
        over_http = await _over_http(name, app_url)
    finally:
        if setup.teardown is not None:
            await setup.teardown(admin_url)
    return {
        **paired_figures(times, REQUESTS),
        "round_trips_per_request": trips,
        "over_http": over_http,
    }


def _target(url: URL) -> dict[str, Any]:
    socket_dir = url.query.get("host")
    if socket_dir:
        return {"unix_path": f"{socket_dir}/.s.PGSQL.{url.port or 5432}"}
    return {"host": url.host, "port": url.port or 5432}


async def main(names: list[str]) -> dict[str, object]:
    unknown = sorted(set(names) - SETUPS.keys())
    if unknown:
        raise SystemExit(f"unknown strategies {unknown}; choose from {sorted(SETUPS)}")
    results: dict[str, object] = {}
    with postgres() as admin_url:
        app_url = await create_app_role(admin_url)
        for name in names:
            results[name] = await measure(name, admin_url, app_url)
    return {
        "benchmark": "strategies",
        "endpoint": "GET /items/{id}",
        "rounds": ROUNDS,
        "requests_per_round": REQUESTS,
        "results": results,
        "target_ratio_min": {n: TARGETS[n] for n in names},
        "target_round_trips_max": 3,
        "peak_rss_mb": peak_rss_mb(),
        "machine": machine(),
    }


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(sys.argv[1:] or list(SETUPS))), indent=2))
