"""The two backends of the QueryScoping suites: PostgreSQL (as the app role) and SQLite.

Each module that imports the fixtures gets its own databases; ``admin`` reseeds both tenants'
rows (colliding keys) before each test and reads back what really happened.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from asgi_tenancy import Tenant
from asgi_tenancy.sqlalchemy import QueryScoping, TenantDatabase
from tests.adversarial.models import Base, seed_rows

ACME = Tenant("acme")  # the tenant that writes; globex holds the same keys
VICTIMS = ("globex",)
TENANT_TABLES = ("projects", "tasks", "accounts", "notes")
Snapshot = dict[str, list[dict[str, Any]]]


@dataclass(frozen=True)
class Backend:
    """One database seen twice: as the application, and as an admin reading back."""

    name: str
    app_url: str
    admin_url: str


def scoping_strategy() -> QueryScoping:
    return QueryScoping(metadata=Base.metadata, shared_tables={"currencies"})


async def create_tables(url: str) -> None:
    engine = create_async_engine(url)
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    await engine.dispose()


@pytest.fixture(scope="module", params=["postgresql", "sqlite"])
def backend(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Backend]:
    if request.param == "postgresql":
        pg = request.getfixturevalue("pg_database")
        asyncio.run(create_tables(pg.admin_url))
        yield Backend("postgresql", pg.app_url, pg.admin_url)
        return
    path: Path = tmp_path_factory.mktemp("scoping") / "tenancy.db"
    url = f"sqlite+aiosqlite:///{path}"
    asyncio.run(create_tables(url))
    yield Backend("sqlite", url, url)


async def reseed(engine: AsyncEngine) -> None:
    """Every table back to ``seed_rows()``."""
    async with engine.begin() as conn:
        for table in reversed(Base.metadata.sorted_tables):
            await conn.execute(table.delete())
        for name, rows in seed_rows().items():
            await conn.execute(insert(Base.metadata.tables[name]), rows)


@pytest.fixture
async def admin(backend: Backend) -> AsyncIterator[AsyncEngine]:
    """Reads back what really happened; reseeds the rows before each test."""
    engine = create_async_engine(backend.admin_url)
    await reseed(engine)
    yield engine
    await engine.dispose()


def _no_fsync(dbapi_connection: Any, record: Any) -> None:
    # A throwaway test file: skipping fsync keeps 500 serialised commits fast.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA synchronous = OFF")
    cursor.close()


async def open_database(backend: Backend, strategy: QueryScoping, **pool: int) -> TenantDatabase:
    options: dict[str, Any] = {"pool_size": 1, "max_overflow": 0, **pool}
    database = TenantDatabase(backend.app_url, strategy, engine_options=options)
    if backend.name == "sqlite":
        event.listen(database.engine.sync_engine, "connect", _no_fsync)
    await database.validate()
    return database


@pytest.fixture
async def db(backend: Backend, admin: AsyncEngine) -> AsyncIterator[TenantDatabase]:
    database = await open_database(backend, scoping_strategy())
    yield database
    await database.dispose()


# -- reading back -------------------------------------------------------------------------------


async def snapshot(admin: AsyncEngine) -> Snapshot:
    async with admin.connect() as conn:
        return {
            name: [
                dict(r._mapping)
                for r in await conn.execute(select(table).order_by(*table.primary_key))
            ]
            for name, table in Base.metadata.tables.items()
        }


def row_key(row: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(sorted((k, str(v)) for k, v in row.items()))


def _theirs(rows: Iterable[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return sorted(row_key(r) for r in rows if r["tenant_id"] != ACME.id)


def _strings(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, (list, tuple)) or hasattr(value, "_mapping"):
        for item in value:
            yield from _strings(item)
    elif hasattr(value, "__table__"):
        for column in value.__table__.columns:
            yield from _strings(value.__dict__.get(column.key))


def assert_isolated(after: Snapshot, returned: Any = None) -> None:
    """No row of another tenant written, changed or deleted; none of its values read into ours."""
    seed = seed_rows()
    for table in TENANT_TABLES:
        assert _theirs(after[table]) == _theirs(seed[table]), f"another tenant's {table} changed"
        own = [r for r in after[table] if r["tenant_id"] == ACME.id]
        leaked = [v for v in _strings(own) if any(victim in v for victim in VICTIMS)]
        assert not leaked, f"another tenant's values were written into acme's {table}: {leaked}"
    assert not [c["code"] for c in after["currencies"] if c["code"].startswith("glo")]
    leaked = [v for v in _strings(returned) if any(victim in v for victim in VICTIMS)]
    assert not leaked, f"another tenant's values were returned: {leaked}"


def own(after: Snapshot, table: str) -> dict[Any, dict[str, Any]]:
    """acme's rows of ``table`` by id."""
    return {r["id"]: r for r in after[table] if r["tenant_id"] == ACME.id}


def seeded(table: str) -> dict[Any, dict[str, Any]]:
    return {r["id"]: r for r in seed_rows()[table] if r["tenant_id"] == ACME.id}


def unchanged(after: Snapshot, returned: Any = None) -> None:
    for table in TENANT_TABLES:
        assert own(after, table) == seeded(table), f"acme's {table} changed"


def matches_seed(after: Snapshot) -> bool:
    seed = seed_rows()
    return all(
        sorted(map(row_key, rows)) == sorted(map(row_key, seed[t])) for t, rows in after.items()
    )


def assert_as_seeded(after: Snapshot) -> None:
    assert matches_seed(after), "a table changed"
