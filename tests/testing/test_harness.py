"""TwoTenants: the database kept per event loop, and the reset after each test."""

from __future__ import annotations

import asyncio
import concurrent.futures

import pytest
from sqlalchemy import insert, update

from asgi_tenancy.sqlalchemy import RowLevelSecurity, TenantDatabase
from asgi_tenancy.sqlalchemy.hooks import hygiene_of
from asgi_tenancy.testing import KitDatabases, TenancyKit, TwoTenants
from tests.conftest import PgServer
from tests.testing.leaky import SETUPS, Provisioning, notes_base

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
    allowed: list[frozenset[str]] = []

    async def twice() -> None:
        for _ in range(2):
            async with harness.database() as database:
                assert database.validated
                seen.append(database)
                judge = hygiene_of(database.engine)
                assert judge is not None
                allowed.append(judge.functions)

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
    # A later loop's database judges statements by the allow-list the first one read.
    assert len(allowed[0]) > 100
    assert all(a == allowed[0] for a in allowed)


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


_TRIGGERED = notes_base()
#: A trigger of the application's: the seeding fired it, so the reset must fire it too.
_MARK = [
    "CREATE FUNCTION mark_note() RETURNS trigger LANGUAGE plpgsql AS"
    " $$ BEGIN NEW.body := NEW.body || ' (marked)'; RETURN NEW; END $$",
    "CREATE TRIGGER mark_note BEFORE INSERT ON notes FOR EACH ROW EXECUTE FUNCTION mark_note()",
]
TRIGGERED = TenancyKit(
    models=_TRIGGERED,
    strategy=lambda: RowLevelSecurity(metadata=_TRIGGERED.metadata),
    provision=Provisioning(_TRIGGERED.metadata, _MARK),
    name="self_rls_trigger",
)


@pytest.mark.parametrize("kit", [SETUPS["rls_correct"].kit, TRIGGERED], ids=["plain", "trigger"])
def test_reset_leaves_the_rows_as_the_seeding_left_them(
    kit: TenancyKit, tenancy_databases: KitDatabases
) -> None:
    """The fast reset skips the foreign-key checks (``session_replication_role = replica``)
    only where that changes nothing: with a trigger of the application's it fires them all."""
    (table,) = kit.metadata.sorted_tables
    harness: TwoTenants = tenancy_databases.prepare(kit)

    async def rows() -> list[list[dict[str, object]]]:
        return [await harness.rows(table, t) for t in (harness.a, harness.b)]

    async def scribble() -> None:
        async with harness.admin() as conn:
            await conn.execute(update(table).values(body="scribbled"))

    first = asyncio.run(rows())  # as the template's seeding left them
    marked = all(str(r["body"]).endswith(" (marked)") for tenant in first for r in tenant)
    assert marked is (kit is TRIGGERED)
    for _ in range(2):
        asyncio.run(scribble())
        harness.reset_now()
        assert asyncio.run(rows()) == first
    script = harness._scripts[None]
    assert script is not None
    assert ("session_replication_role" in script) is (kit is not TRIGGERED)


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


def test_two_clones_take_turns_and_each_test_starts_from_the_seeded_rows(
    tenancy_databases: KitDatabases,
) -> None:
    """A test runs on one clone while the other's rows go back: every test still starts from
    the seeded rows, whatever the test before it did."""
    kit = SETUPS["rls_correct"].kit
    (table,) = kit.metadata.sorted_tables
    seen: list[TwoTenants] = []

    async def rows(harness: TwoTenants) -> list[list[dict[str, object]]]:
        return [await harness.rows(table, t) for t in (harness.a, harness.b)]

    async def scribble(harness: TwoTenants) -> None:
        async with harness.admin() as conn:
            await conn.execute(update(table).values(body="scribbled"))

    for _ in range(4):
        with tenancy_databases.use(kit) as harness:
            seen.append(harness)
            assert asyncio.run(rows(harness)) == [
                harness.seeded(table, t) for t in (harness.a, harness.b)
            ]
            asyncio.run(scribble(harness))
    assert seen[0] is seen[2]
    assert seen[1] is seen[3]
    assert seen[0] is not seen[1]
    assert seen[0].name != seen[1].name
