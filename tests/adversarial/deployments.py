"""Five deployments of one small app on a real PostgreSQL, for attacks that every strategy faces.

``row`` (RLS), ``row-signed``, ``schema``, ``schema-hardened`` and ``database`` (a database
per tenant). Each serves two tenants, acme and globex, whose ``items`` share primary keys
(bodies name their owner), through one connection (``pool_size=1``), so the next checkout is
the same connection unless hygiene replaced it. The app role is ``tenancy_app``: no superuser,
no BYPASSRLS, owns nothing, no TEMPORARY.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from sqlalchemy import Column, Integer, MetaData, String, Table, Text, text
from sqlalchemy.ext.asyncio import create_async_engine

from asgi_tenancy import Tenant
from asgi_tenancy.sqlalchemy import (
    DatabasePerTenant,
    IsolationStrategy,
    RowLevelSecurity,
    SchemaPerTenant,
    TenantDatabase,
)
from tests.conftest import APP_ROLE, PgDatabase, PgServer, create_database, drop_database

KEY = "deployments-signing-key-0123456789abcdef"
ROWS = 5
KINDS = ("row", "row-signed", "schema", "schema-hardened", "database")

row_metadata = MetaData()
Table(
    "items",
    row_metadata,
    Column("tenant_id", String(63), primary_key=True),
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("body", Text, nullable=False),
)
plain_metadata = MetaData()
Table(
    "items",
    plain_metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("body", Text, nullable=False),
)


@dataclass
class Deployment:
    kind: str
    make: Callable[[], TenantDatabase]
    tenants: dict[str, Tenant]
    admin_urls: dict[str, str]  # where each tenant's items live, as the admin
    items: dict[str, str]  # the qualified name of each tenant's table
    databases: list[PgDatabase] = field(default_factory=list)

    @property
    def schemas(self) -> bool:
        return self.kind.startswith("schema")


def _run(*steps: tuple[str, list[str]]) -> None:
    async def go() -> None:
        for url, statements in steps:
            engine = create_async_engine(url)
            try:
                async with engine.begin() as conn:
                    for statement in statements:
                        await conn.execute(text(statement))
            finally:
                await engine.dispose()

    asyncio.run(go())


def _seed_rows(table: str, tenant: str, tenant_column: bool) -> str:
    columns = "tenant_id, id, body" if tenant_column else "id, body"
    owner = f"'{tenant}', " if tenant_column else ""
    return (
        f"INSERT INTO {table} ({columns}) SELECT {owner}i, '{tenant}-item-' || i"
        f" FROM generate_series(1, {ROWS}) i"
    )


def _row(server: PgServer, signed: bool) -> Deployment:
    db = create_database(server, "dep_row_signed" if signed else "dep_row")
    options = {"signed": True, "signing_keys": [KEY]} if signed else {}

    def strategy() -> IsolationStrategy:
        return RowLevelSecurity(metadata=row_metadata, **options)  # type: ignore[arg-type]

    ddl = strategy().ddl()  # type: ignore[attr-defined]
    create = (
        "CREATE TABLE items (tenant_id varchar(63), id int, body text NOT NULL,"
        " PRIMARY KEY (tenant_id, id))"
    )
    _run((db.admin_url, [create, *ddl, _seed_rows("items", "acme", True)]))
    _run((db.admin_url, [_seed_rows("items", "globex", True)]))
    if signed:

        async def keys() -> None:
            engine = create_async_engine(db.admin_url)
            async with engine.begin() as conn:
                await strategy().install_keys(conn)  # type: ignore[attr-defined]
            await engine.dispose()

        asyncio.run(keys())
    tenants = {t: Tenant(t) for t in ("acme", "globex")}
    return Deployment(
        "row-signed" if signed else "row",
        lambda: TenantDatabase(db.app_url, strategy(), engine_options=_ONE),
        tenants,
        {t: db.admin_url for t in tenants},
        {t: "items" for t in tenants},
        [db],
    )


def _schema(server: PgServer, hardened: bool) -> Deployment:
    db = create_database(server, "dep_schema_hardened" if hardened else "dep_schema")
    options = (
        {"hardened": True, "signing_keys": [KEY], "function_schema": "tenancy"} if hardened else {}
    )

    def strategy() -> SchemaPerTenant:
        return SchemaPerTenant(metadata=plain_metadata, shared_schema=None, **options)  # type: ignore[arg-type]

    statements = ["CREATE SCHEMA tenancy", f"GRANT USAGE ON SCHEMA tenancy TO {APP_ROLE}"]
    _run((db.admin_url, statements))

    async def provision() -> None:
        engine = create_async_engine(db.admin_url)
        async with engine.begin() as conn:
            chosen = strategy()
            await chosen.install(conn)
            for tenant in ("acme", "globex"):
                await chosen.create_tenant_schema(conn, Tenant(tenant), APP_ROLE)
                await conn.execute(text(_seed_rows(f"tenant_{tenant}.items", tenant, False)))
        await engine.dispose()

    asyncio.run(provision())
    tenants = {t: Tenant(t) for t in ("acme", "globex")}
    return Deployment(
        "schema-hardened" if hardened else "schema",
        lambda: TenantDatabase(db.app_url, strategy(), engine_options=_ONE),
        tenants,
        {t: db.admin_url for t in tenants},
        {t: f"tenant_{t}.items" for t in tenants},
        [db],
    )


def _database(server: PgServer) -> Deployment:
    central = create_database(server, "dep_central")
    own = {t: create_database(server, f"dep_{t}") for t in ("acme", "globex")}
    for tenant, db in own.items():
        create = "CREATE TABLE items (id int PRIMARY KEY, body text NOT NULL)"
        _run((db.admin_url, [create, _seed_rows("items", tenant, False)]))
    tenants = {t: Tenant(t, attributes={"database_url": db.app_url}) for t, db in own.items()}
    return Deployment(
        "database",
        lambda: TenantDatabase(
            central.app_url, DatabasePerTenant(pool_size_per_engine=1, max_connections=4)
        ),
        tenants,
        {t: db.admin_url for t, db in own.items()},
        {t: "items" for t in tenants},
        [central, *own.values()],
    )


_ONE = {"pool_size": 1, "max_overflow": 0}


def deploy(server: PgServer, kind: str) -> Deployment:
    if kind in ("row", "row-signed"):
        return _row(server, kind == "row-signed")
    if kind in ("schema", "schema-hardened"):
        return _schema(server, kind == "schema-hardened")
    return _database(server)


def deployed(server: PgServer, kind: str) -> Iterator[Deployment]:
    deployment = deploy(server, kind)
    try:
        yield deployment
    finally:
        for db in deployment.databases:
            drop_database(server, db)
