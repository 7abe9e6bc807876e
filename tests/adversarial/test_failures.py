"""Database failures inside ``TenantDatabase.session()`` leave it as ``TenancyError``s.

One boundary (``asgi_tenancy.sqlalchemy.failures``): every SQLSTATE it knows, raised by the real
server inside a tenant's session, becomes its error type with its own code, never the
driver's message; what it does not know passes through unchanged; the next session is clean.
"""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError, ProgrammingError
from sqlalchemy.ext.asyncio import AsyncEngine

from asgi_tenancy import TenancyError, Tenant, tenant_scope
from asgi_tenancy.errors import (
    DatabaseConflict,
    DatabaseTimeout,
    DatabaseUnavailable,
    InvalidValue,
    TenantCapacityExceeded,
)
from asgi_tenancy.sqlalchemy import RowLevelSecurity, TenantDatabase
from tests.adversarial.models import ROWS_PER_TENANT, Base, Project
from tests.conftest import PgDatabase

ACME = Tenant("acme")
SECRET = "postgresql://leak:hunter2@db.internal/app"


@pytest.fixture(scope="module")
def rls_strategy() -> RowLevelSecurity:
    return RowLevelSecurity(metadata=Base.metadata, shared_tables={"currencies"})


async def _failure(db: TenantDatabase, *statements: str) -> BaseException:
    """What leaves acme's session when the server fails ``statements``."""
    try:
        async with tenant_scope(ACME), db.session() as s:
            for statement in statements:
                await s.execute(text(statement))
    except Exception as exc:
        return exc
    raise AssertionError("the statements did not fail")


async def _raise_state(db: TenantDatabase, state: str) -> BaseException:
    """The server raises ``state`` (with a message naming a DSN) in acme's session."""
    return await _failure(
        db,
        f"DO $$ BEGIN RAISE EXCEPTION USING ERRCODE = '{state}', MESSAGE = 'boom {SECRET}'; END $$",
    )


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        ("40001", DatabaseConflict),  # serialization_failure
        ("40P01", DatabaseConflict),  # deadlock_detected
        ("57014", DatabaseTimeout),  # query_canceled (statement_timeout)
        ("55P03", DatabaseTimeout),  # lock_not_available (lock_timeout)
        ("57P01", DatabaseUnavailable),  # admin_shutdown
        ("57P02", DatabaseUnavailable),  # crash_shutdown
        ("57P03", DatabaseUnavailable),  # cannot_connect_now
        ("08006", DatabaseUnavailable),  # connection_failure
        ("3D000", DatabaseUnavailable),  # invalid_catalog_name (a moved tenant's old database)
        ("22003", InvalidValue),  # numeric_value_out_of_range
        ("22P02", InvalidValue),  # invalid_text_representation
        ("22021", InvalidValue),  # character_not_in_repertoire
    ],
)
async def test_each_known_sqlstate_becomes_its_error_without_the_drivers_message(
    db: TenantDatabase, state: str, expected: type[TenancyError]
) -> None:
    error = await _raise_state(db, state)
    assert type(error) is expected
    assert SECRET not in str(error)
    assert "hunter2" not in str(error)
    assert isinstance(error.__cause__, Exception)  # the original kept for the log
    async with tenant_scope(ACME), db.session() as s:  # the next session is clean
        assert len((await s.scalars(select(Project))).all()) == ROWS_PER_TENANT


@pytest.mark.parametrize("state", ["23505", "42P01", "42501", "XX000", "P0001"])
async def test_what_the_boundary_does_not_know_passes_through(
    db: TenantDatabase, state: str
) -> None:
    error = await _raise_state(db, state)
    assert not isinstance(error, TenancyError)


async def test_codes_statuses_and_retry_after_are_distinct() -> None:
    kinds = [DatabaseConflict, DatabaseTimeout, DatabaseUnavailable, InvalidValue]
    assert len({k.code for k in kinds}) == len(kinds)
    assert DatabaseTimeout.status_code == 504
    assert InvalidValue.status_code == 400
    assert all(k.retry_after for k in (DatabaseConflict, DatabaseTimeout, DatabaseUnavailable))


async def test_a_real_statement_timeout_is_a_504(db: TenantDatabase) -> None:
    timeout = "SELECT set_config('statement_timeout', '50ms', true)"
    assert isinstance(await _failure(db, timeout, "SELECT pg_sleep(2)"), DatabaseTimeout)


async def _get(db: TenantDatabase, key: int) -> Project | None:
    async with tenant_scope(ACME), db.session() as s:
        return await s.get(Project, ("acme", key))


@pytest.mark.parametrize("value", [2**31, 2**63, -(2**40), 10**30])
async def test_a_value_the_driver_refuses_is_a_400(db: TenantDatabase, value: int) -> None:
    with pytest.raises(InvalidValue):
        await _get(db, value)  # an int32 column: asyncpg refuses before sending


async def _killed_mid_session(db: TenantDatabase, admin_engine: AsyncEngine) -> None:
    async with tenant_scope(ACME), db.session() as s:
        pid = await s.scalar(text("SELECT pg_backend_pid()"))
        async with admin_engine.begin() as conn:
            await conn.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid})
        await s.execute(text("SELECT 1"))


async def test_a_killed_backend_is_unavailable_then_the_pool_heals(
    db: TenantDatabase, admin_engine: AsyncEngine
) -> None:
    with pytest.raises(DatabaseUnavailable):
        await _killed_mid_session(db, admin_engine)
    async with tenant_scope(ACME), db.session() as s:
        assert len((await s.scalars(select(Project))).all()) == ROWS_PER_TENANT


async def test_an_exhausted_pool_is_capacity_exceeded(rls_database: PgDatabase) -> None:
    database = TenantDatabase(
        rls_database.app_url,
        RowLevelSecurity(metadata=Base.metadata, shared_tables={"currencies"}),
        engine_options={"pool_size": 1, "max_overflow": 0, "pool_timeout": 0.2},
    )
    await database.validate()
    held = asyncio.Event()
    release = asyncio.Event()

    async def hold() -> None:
        async with tenant_scope(ACME), database.session() as s:
            await s.execute(text("SELECT 1"))
            held.set()
            await release.wait()

    holder = asyncio.create_task(hold())
    try:
        await held.wait()
        assert isinstance(await _failure(database, "SELECT 1"), TenantCapacityExceeded)
    finally:
        release.set()
        await holder
        await database.dispose()


async def _add_duplicate(db: TenantDatabase) -> None:
    async with tenant_scope(ACME), db.session() as s:
        s.add(Project(tenant_id="acme", id=1, name="duplicate"))
        await s.flush()


async def test_integrity_and_programming_errors_stay_the_applications(db: TenantDatabase) -> None:
    with pytest.raises(IntegrityError):
        await _add_duplicate(db)
    assert isinstance(await _failure(db, "SELECT * FROM no_such_table"), ProgrammingError)


async def test_a_citus_shard_gone_under_the_statement_is_a_retryable_conflict(
    db: TenantDatabase,
) -> None:
    """What Citus raises when a tenant's shard is split or moved between a statement's
    planning and its execution (tests/citus/test_move.py meets it for real): retry, not 500."""
    error = await _failure(
        db,
        "DO $$ BEGIN RAISE EXCEPTION USING ERRCODE = 'XX000',"
        " MESSAGE = 'could not find valid entry for shard 102008'; END $$",
    )
    assert type(error) is DatabaseConflict
    assert "102008" not in str(error)
