"""TwoTenants: the database kept per event loop, and the reset after each test."""

from __future__ import annotations

import asyncio
import concurrent.futures

import pytest
from sqlalchemy import insert, update

from asgi_tenancy.sqlalchemy import TenantDatabase
from asgi_tenancy.testing import KitDatabases, TwoTenants
from tests.conftest import PgServer
from tests.testing.leaky import SETUPS

pytest_plugins = ["asgi_tenancy.testing"]

CORRECT = [name for name in SETUPS if name.endswith("_correct")]


@pytest.fixture(scope="session")
def tenancy_database_url(pg_server: PgServer) -> str:
    return pg_server.admin_url.render_as_string(hide_password=False)


def test_one_database_per_event_loop_disposed_when_the_loop_closes(
    tenancy_databases: KitDatabases,
) -> None:
    harness = tenancy_databases.prepare(SETUPS["rls_correct"].kit)
    seen: list[TenantDatabase] = []

    async def twice() -> None:
        for _ in range(2):
            async with harness.database() as database:
                assert database.validated
                seen.append(database)

    runner = asyncio.Runner()
    runner.run(twice())
    runner.run(twice())
    assert len({id(d) for d in seen}) == 1  # one loop: one database, kept
    runner.close()
    assert not seen[0].validated  # disposed as the loop shut down
    asyncio.run(twice())
    assert len({id(d) for d in seen}) == 2
    assert seen[-1] is not seen[0]
    assert not seen[-1].validated


@pytest.mark.parametrize("name", CORRECT)
@pytest.mark.parametrize("script", [True, False], ids=["one-round-trip", "statements"])
def test_reset_puts_every_seeded_row_back(
    name: str, script: bool, tenancy_databases: KitDatabases
) -> None:
    setup = SETUPS[name]
    (table,) = setup.kit.metadata.sorted_tables
    harness: TwoTenants = tenancy_databases.prepare(setup.kit)
    if not script:
        harness._scripts = dict.fromkeys((None, 0, 1), None)  # the statement-by-statement path

    async def scribble() -> None:
        for tenant in (harness.a, harness.b):
            async with harness.admin(tenant) as conn:
                options = setup.kit.layout.options(tenant)
                await conn.execute(
                    update(table).values(body="scribbled"), execution_options=options
                )
                row = setup.kit.rows.row(table, harness.index(tenant), 9)
                await conn.execute(insert(table).values(row), execution_options=options)

    async def rows() -> list[list[dict[str, object]]]:
        return [await harness.rows(table, t) for t in (harness.a, harness.b)]

    try:
        asyncio.run(scribble())
        assert asyncio.run(rows()) != [harness.seeded(table, t) for t in (harness.a, harness.b)]
        harness.reset_now()
        assert asyncio.run(rows()) == [harness.seeded(table, t) for t in (harness.a, harness.b)]
    finally:
        harness._scripts = {}
        harness.reset_now()


def test_a_failed_background_reset_is_reported_before_the_next_use(
    tenancy_databases: KitDatabases,
) -> None:
    harness = tenancy_databases.prepare(SETUPS["rls_correct"].kit)
    failed: concurrent.futures.Future[None] = concurrent.futures.Future()
    failed.set_exception(OSError("connection lost"))
    harness._pending = failed
    with pytest.raises(RuntimeError, match="could not put the seeded rows back") as caught:
        tenancy_databases.prepare(SETUPS["rls_correct"].kit)
    assert isinstance(caught.value.__cause__, OSError)
    tenancy_databases.prepare(SETUPS["rls_correct"].kit)  # reported once
