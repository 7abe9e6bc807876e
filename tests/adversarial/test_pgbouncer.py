"""Through PgBouncer in transaction mode: many clients, few server connections, same guarantees.

The session's PgBouncer (``tests/adversarial/pgbouncer.py``) pools 2 server connections per
database and role; the application's engine opens up to 20 client connections to it. The cases
of test_rls.py and test_schema.py run again through it, then the cases that only pooling can
break: concurrent tenants interleaving on shared server connections, session-level state that
raw SQL leaves on a server connection, and the signed binding (tied to one server process),
which must fail closed. What really happened is read back through a direct admin connection.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError, ProgrammingError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from asgi_tenancy import IsolationConfigError, Tenant, tenant_scope
from asgi_tenancy.sqlalchemy import RowLevelSecurity, TenantDatabase
from asgi_tenancy.sqlalchemy.rls.signing import mac
from tests.adversarial import pgbouncer as bouncer
from tests.adversarial import test_rls as rls_cases
from tests.adversarial import test_schema as schema_cases
from tests.adversarial.conftest import _set_up as set_up_rls
from tests.adversarial.leaks import foreign_rows
from tests.adversarial.models import ROWS_PER_TENANT, Base, Project
from tests.conftest import (
    APP_PASSWORD,
    APP_ROLE,
    PgDatabase,
    PgServer,
    admin_run,
    create_database,
    drop_database,
)

ACME, GLOBEX, INITECH = Tenant("acme"), Tenant("globex"), Tenant("initech")
TENANTS = (ACME, GLOBEX, INITECH)
SERVER_POOL = int(bouncer.SETTINGS["default_pool_size"])
CLIENTS = 20  # client connections of the application's engine, over SERVER_POOL servers
SIGNING_KEY = "signing-key-for-pgbouncer-0123456789abcdef"

Case = Callable[..., Awaitable[None]]


async def _database(
    pgb: bouncer.PgBouncer, name: str, strategy: Any, clients: int = CLIENTS, validate: bool = True
) -> TenantDatabase:
    database = TenantDatabase(
        pgb.url(name, password=APP_PASSWORD),
        strategy,
        engine_options={
            "pool_size": clients,
            "max_overflow": 0,
            "connect_args": dict(bouncer.CONNECT_ARGS),
        },
    )
    if validate:
        try:
            await database.validate()
        except BaseException:
            await database.dispose()
            raise
    return database


# -- row-level security (unsigned) ---------------------------------------------------------


@pytest.fixture(scope="module")
def rls_strategy() -> RowLevelSecurity:
    return RowLevelSecurity(metadata=Base.metadata, shared_tables={"currencies"})


@pytest.fixture
async def db(
    rls_database: PgDatabase, rls_strategy: RowLevelSecurity, pgbouncer: bouncer.PgBouncer
) -> AsyncIterator[TenantDatabase]:
    database = await _database(pgbouncer, rls_database.name, rls_strategy)
    yield database
    await database.dispose()


RLS_CASES: list[Case] = [
    rls_cases.test_reads_see_only_own_rows,
    rls_cases.test_aggregates_joins_subqueries_ctes_and_pagination,
    rls_cases.test_selectin_and_joined_loads_stay_in_tenant,
    rls_cases.test_get_update_delete_another_tenants_key_find_nothing,
    rls_cases.test_update_of_another_tenants_key_changes_nothing,
    rls_cases.test_bulk_update_and_delete_touch_only_own_rows,
    rls_cases.test_forged_insert_is_rejected,
    rls_cases.test_inserts_are_stamped,
    rls_cases.test_upsert_and_returning_touch_only_own_rows,
    rls_cases.test_the_setting_survives_commit_and_rollback,
    rls_cases.test_savepoints_keep_the_binding,
    rls_cases.test_error_mid_transaction_leaves_the_next_one_clean,
    rls_cases.test_unsigned_binding_can_be_rewritten_by_raw_sql,
]


async def _run_case(case: Case, **available: Any) -> None:
    wanted = inspect.signature(case).parameters
    await case(**{name: value for name, value in available.items() if name in wanted})


@pytest.mark.parametrize("case", RLS_CASES, ids=lambda case: case.__name__)
async def test_rls_cases_hold_through_pgbouncer(
    case: Case, db: TenantDatabase, admin_engine: AsyncEngine
) -> None:
    await _run_case(case, db=db, admin_engine=admin_engine)


# -- schema per tenant ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def schema_database(pg_server: PgServer) -> Iterator[PgDatabase]:
    """test_schema.py's set-up (three tenant schemas, colliding keys) in a database of its own."""
    db = create_database(pg_server, "pgbouncer_schema")
    try:
        asyncio.run(schema_cases._set_up(db.admin_url, db.name))
        yield db
    finally:
        drop_database(pg_server, db)


@pytest.fixture
async def schema_admin(schema_database: PgDatabase) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(schema_database.admin_url)
    yield engine
    await engine.dispose()


@pytest.fixture
async def schema_db(
    schema_database: PgDatabase, pgbouncer: bouncer.PgBouncer
) -> AsyncIterator[TenantDatabase]:
    database = await _database(pgbouncer, schema_database.name, schema_cases._strategy())
    yield database
    await database.dispose()


@pytest.fixture
async def schema_role_db(
    schema_database: PgDatabase, pgbouncer: bouncer.PgBouncer
) -> AsyncIterator[TenantDatabase]:
    """Per-tenant roles; before PostgreSQL 16 the app role must be NOINHERIT (as test_schema)."""
    legacy = await schema_cases._server_version(schema_database.admin_url) < 160000
    if legacy:
        await schema_cases._set_inherit(schema_database.admin_url, inherit=False)
    strategy = schema_cases._strategy(per_tenant_roles=True, role_attribute="role")
    try:
        database = await _database(pgbouncer, schema_database.name, strategy)
        yield database
        await database.dispose()
    finally:
        if legacy:
            await schema_cases._set_inherit(schema_database.admin_url, inherit=True)


SCHEMA_CASES: list[Case] = [
    schema_cases.test_reads_joins_ctes_and_loads_see_only_own_rows,
    schema_cases.test_another_tenants_key_is_not_found_nor_changed,
    schema_cases.test_bulk_update_and_delete_touch_only_own_rows,
    schema_cases.test_raw_sql_reads_the_tenant_schema_only,
    schema_cases.test_a_missing_table_errors_instead_of_reading_public,
    schema_cases.test_the_binding_survives_commit_and_rollback,
    schema_cases.test_an_error_mid_transaction_leaves_the_next_one_clean,
    schema_cases.test_session_level_raw_settings_never_outlive_into_the_next_binding,
    schema_cases.test_per_tenant_roles_refuse_another_tenants_schema,
    schema_cases.test_raw_sql_can_move_the_path_only_within_its_roles_privileges,
]


@pytest.mark.parametrize("case", SCHEMA_CASES, ids=lambda case: case.__name__)
async def test_schema_cases_hold_through_pgbouncer(
    case: Case,
    schema_db: TenantDatabase,
    schema_role_db: TenantDatabase,
    schema_admin: AsyncEngine,
) -> None:
    await _run_case(case, db=schema_db, role_db=schema_role_db, admin_engine=schema_admin)


async def test_with_asyncpg_statement_cache_on_statements_fail_never_leak(
    rls_database: PgDatabase, rls_strategy: RowLevelSecurity, pgbouncer: bouncer.PgBouncer
) -> None:
    """Why ``statement_cache_size=0`` is required with PgBouncer before 1.21: a statement
    prepared by name on one server connection is looked for on another. A clean error
    (SQLSTATE 26000), never another tenant's rows."""
    database = TenantDatabase(
        pgbouncer.url(rls_database.name, password=APP_PASSWORD),
        rls_strategy,
        engine_options={"pool_size": CLIENTS, "max_overflow": 0},  # asyncpg's defaults
    )
    # validate() itself runs into the same failures here; the same strategy validates clean
    # with the cache off, and what this test shows is the requests that follow.
    checked = TenantDatabase(
        pgbouncer.url(rls_database.name, password=APP_PASSWORD),
        rls_strategy,
        engine_options={"connect_args": {"statement_cache_size": 0}},
    )
    await checked.validate()
    await checked.dispose()
    database._validated = True
    names: list[str] = []
    foreign: list[object] = []
    errors: list[DBAPIError] = []

    async def request(i: int) -> None:
        tenant = TENANTS[i % 3]
        async with tenant_scope(tenant), database.session() as s:
            for _ in range(3):  # the same statements, one transaction each
                try:
                    rows = (await s.scalars(select(Project.name).where(Project.id <= 3))).all()
                except DBAPIError as exc:
                    errors.append(exc)
                    await s.rollback()
                    continue
                names.extend(rows)
                foreign.extend(foreign_rows(rows, tenant.id))
                await s.commit()

    try:
        await asyncio.gather(*(request(i) for i in range(3 * CLIENTS)))
    finally:
        await database.dispose()
    assert foreign == []
    assert names  # a statement runs on the server it was prepared on...
    assert errors  # ...and fails by name on the other one
    assert {getattr(exc.orig, "sqlstate", None) for exc in errors} == {"26000"}
    assert all("does not exist" in str(exc) for exc in errors)


# -- signed binding: tied to one server process, so it must fail closed --------------------


@pytest.fixture(scope="module")
def signed_database(pg_server: PgServer) -> Iterator[PgDatabase]:
    db = create_database(pg_server, "pgbouncer_signed")
    strategy = RowLevelSecurity(
        metadata=Base.metadata,
        shared_tables={"currencies"},
        signed=True,
        signing_keys=[SIGNING_KEY],
    )
    try:
        asyncio.run(set_up_rls(db.admin_url, strategy))
        yield db
    finally:
        drop_database(pg_server, db)


async def test_signed_binding_fails_closed_behind_transaction_pooling(
    signed_database: PgDatabase, pgbouncer: bouncer.PgBouncer
) -> None:
    strategy = RowLevelSecurity(
        metadata=Base.metadata,
        shared_tables={"currencies"},
        signed=True,
        signing_keys=[SIGNING_KEY],
    )
    with pytest.raises(IsolationConfigError, match="R017"):  # refused at start-up...
        await _database(pgbouncer, signed_database.name, strategy)
    database = await _database(pgbouncer, signed_database.name, strategy, validate=False)
    database._validated = True  # ...and, were the gate forced open, every query fails closed
    admin = create_async_engine(signed_database.admin_url)
    seen: list[str] = []
    errors: list[BaseException] = []

    async def request(i: int) -> None:
        tenant = TENANTS[i % 3]
        async with tenant_scope(tenant), database.session() as s:
            try:
                seen.extend((await s.execute(text("SELECT name FROM projects"))).scalars())
            except DBAPIError as exc:
                errors.append(exc)
                await s.rollback()
            try:
                s.add(Project(id=5000 + i, name=f"{tenant.id}-signed-{i}"))
                await s.commit()
            except DBAPIError as exc:
                errors.append(exc)

    try:
        await asyncio.gather(*(request(i) for i in range(2 * CLIENTS)))
        async with admin.connect() as conn:
            written = await conn.scalar(text("SELECT count(*) FROM projects WHERE id >= 5000"))
    finally:
        await database.dispose()
        await admin.dispose()
    assert seen == []
    assert written == 0
    assert len(errors) == 4 * CLIENTS
    for exc in errors:
        # No signing session on that server process: the BEGIN message cannot draw its
        # counter (08003, the connection is replaced) or the check finds none (08T01); or
        # another connection's session, whose key did not sign the token (42501).
        assert getattr(exc.orig, "sqlstate", None) in {"08003", "08T01", "42501"}
        assert re.search("signing session|not signed for this connection|could not bind", str(exc))


# -- many clients, few server connections ---------------------------------------------------


async def _driver(session: AsyncSession) -> Any:
    connection = await session.connection()
    raw = await connection.get_raw_connection()
    return raw.driver_connection


async def _interleave(
    database: TenantDatabase,
    make_row: Callable[[int, Tenant], Any],
    model: Any,
    tenant_for: Callable[[Tenant], Tenant] = lambda t: t,
) -> tuple[list[str], set[int], set[int]]:
    """3 x CLIENTS requests of three tenants, each yielding mid-transaction while holding a
    server connection, reading and writing rows whose keys collide across tenants.

    Returns the foreign values seen, the server process ids and PgBouncer's client ids."""
    foreign: list[str] = []
    servers: set[int] = set()
    clients: set[int] = set()

    async def request(i: int) -> None:
        tenant = TENANTS[i % 3]
        async with tenant_scope(tenant_for(tenant)), database.session() as s:
            servers.add(int(await s.scalar(text("SELECT pg_backend_pid()")) or 0))
            clients.add(int((await _driver(s)).get_server_pid()))
            first = (await s.execute(text("SELECT name FROM projects WHERE id <= 3"))).scalars()
            seen = list(first)
            await asyncio.sleep(0)  # yield while holding the server: other tenants run now
            s.add(make_row(i, tenant))
            await s.flush()
            seen += (await s.scalars(select(model.name).where(model.id >= 1000))).all()
            await s.commit()  # the server goes back to PgBouncer; the next BEGIN rebinds
            servers.add(int(await s.scalar(text("SELECT pg_backend_pid()")) or 0))
            seen += (await s.scalars(select(model.name).where(model.id == 2))).all()
        assert len(seen) >= 4
        foreign.extend(v for v in seen if not v.startswith(f"{tenant.id}-"))

    await asyncio.gather(*(request(i) for i in range(3 * CLIENTS)))
    return foreign, servers, clients


async def _app_backends(admin: AsyncEngine, database: str) -> int:
    async with admin.connect() as conn:
        return int(
            await conn.scalar(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE usename = :role AND datname = :db"
                ),
                {"role": APP_ROLE, "db": database},
            )
            or 0
        )


async def test_many_rls_clients_on_two_server_connections_never_see_each_other(
    db: TenantDatabase, admin_engine: AsyncEngine, rls_database: PgDatabase
) -> None:
    def row(i: int, tenant: Tenant) -> Project:
        return Project(id=1000 + i // 3, name=f"{tenant.id}-concurrent-{i}")  # stamped

    try:
        foreign, servers, clients = await _interleave(db, row, Project)
        async with admin_engine.connect() as conn:
            written = (
                await conn.execute(
                    text(
                        "SELECT tenant_id, count(*) FILTER (WHERE name LIKE tenant_id || '-%')"
                        " FROM projects WHERE id >= 1000 GROUP BY tenant_id ORDER BY 1"
                    )
                )
            ).all()
        backends = await _app_backends(admin_engine, rls_database.name)
    finally:
        async with admin_engine.begin() as conn:
            await conn.execute(text("DELETE FROM projects WHERE id >= 1000"))
    assert foreign == []
    assert written == [("acme", CLIENTS), ("globex", CLIENTS), ("initech", CLIENTS)]
    assert len(clients) == CLIENTS  # the application really had 20 connections...
    assert len(servers) == SERVER_POOL  # ...and PgBouncer served them all on two
    assert backends <= SERVER_POOL


async def test_many_schema_clients_on_two_server_connections_never_see_each_other(
    schema_db: TenantDatabase, schema_admin: AsyncEngine, schema_database: PgDatabase
) -> None:
    def row(i: int, tenant: Tenant) -> schema_cases.Project:
        return schema_cases.Project(id=1000 + i // 3, name=f"{tenant.id}-concurrent-{i}")

    try:
        foreign, servers, clients = await _interleave(schema_db, row, schema_cases.Project)
        async with schema_admin.connect() as conn:
            written = [
                await conn.scalar(
                    text(
                        f"SELECT count(*) FILTER (WHERE name LIKE '{t.id}-%')"
                        f" FROM tenant_{t.id}.projects WHERE id >= 1000"
                    )
                )
                for t in TENANTS
            ]
        backends = await _app_backends(schema_admin, schema_database.name)
    finally:
        async with schema_admin.begin() as conn:
            for t in TENANTS:
                await conn.execute(text(f"DELETE FROM tenant_{t.id}.projects WHERE id >= 1000"))
    assert foreign == []
    assert written == [CLIENTS, CLIENTS, CLIENTS]
    assert len(clients) == CLIENTS
    assert len(servers) == SERVER_POOL
    assert backends <= SERVER_POOL


@pytest.mark.parametrize("isolation", ["row", "schema"])
async def test_after_commit_the_binding_follows_the_session_onto_another_server(
    isolation: str, db: TenantDatabase, schema_db: TenantDatabase
) -> None:
    """A session's second transaction forced onto the other server connection (the first one
    is held by another tenant meanwhile): bound again, to its own tenant, on both."""
    database = db if isolation == "row" else schema_db
    holding, release = asyncio.Event(), asyncio.Event()
    held: list[int] = []

    async def read(s: AsyncSession) -> tuple[int, list[str]]:
        pid = int(await s.scalar(text("SELECT pg_backend_pid()")) or 0)
        names = list((await s.execute(text("SELECT name FROM projects WHERE id <= 20"))).scalars())
        return pid, names

    async def other_tenant(wanted: int) -> list[str]:
        try:
            for _ in range(20):  # PgBouncer hands out the server released last: one try, mostly
                async with tenant_scope(GLOBEX), database.session() as s:
                    pid, names = await read(s)
                    if pid != wanted:
                        continue
                    held.append(pid)
                    holding.set()
                    await release.wait()  # hold that server during acme's next transaction
                    return names + (await read(s))[1]
            return []
        finally:
            holding.set()  # never leave the test waiting, whatever happened here

    async with tenant_scope(ACME), database.session() as s:
        first, before = await read(s)
        await s.commit()
        globex = asyncio.create_task(other_tenant(first), context=contextvars.Context())
        await holding.wait()
        try:
            second, after = await read(s)
        finally:
            release.set()
        globex_names = await globex
    assert held == [first]
    assert second != first  # the same session, on the other server connection
    for names, tenant in ((before, "acme"), (after, "acme"), (globex_names, "globex")):
        assert len(names) >= ROWS_PER_TENANT
        assert not foreign_rows(names, tenant)


# -- raw SQL that changes the binding, and what it leaves on a server connection -------------

OTHER_ROLE = "tenancy_pgb_other"  # a role the app role may SET ROLE to (cluster-wide)


@pytest.fixture(scope="module")
def other_role(rls_database: PgDatabase, pg_server: PgServer) -> Iterator[str]:
    """A role the application role is a member of (no inheritance), subject to RLS itself."""

    async def run(*statements: str) -> None:
        engine = create_async_engine(rls_database.admin_url, isolation_level="AUTOCOMMIT")
        try:
            async with engine.connect() as conn:
                version = int(await conn.scalar(text("SHOW server_version_num")) or 0)
                for statement in statements:
                    if version < 160000:
                        statement = statement.replace(" WITH INHERIT FALSE", "")
                    await conn.execute(text(statement))
        finally:
            await engine.dispose()

    asyncio.run(
        run(
            f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{OTHER_ROLE}')"
            f" THEN CREATE ROLE {OTHER_ROLE} NOLOGIN NOSUPERUSER NOBYPASSRLS; END IF; END $$",
            f"GRANT SELECT ON projects TO {OTHER_ROLE}",
            f"GRANT {OTHER_ROLE} TO {APP_ROLE} WITH INHERIT FALSE",
        )
    )
    try:
        yield OTHER_ROLE
    finally:  # no membership may outlive this module (test_schema checks the app role's)
        asyncio.run(run(f"REVOKE {OTHER_ROLE} FROM {APP_ROLE}"))


async def _on_every_server(
    count: int, body: Callable[[asyncio.Barrier], Awaitable[dict[str, Any]]]
) -> list[dict[str, Any]]:
    """``count`` concurrent transactions, each holding its server until all hold one: with
    ``count == SERVER_POOL`` every server connection of the pool is checked, the one the
    previous client left included."""
    barrier = asyncio.Barrier(count)
    return list(await asyncio.gather(*(body(barrier) for _ in range(count))))


_STATE = "SELECT pg_backend_pid() AS pid, current_user AS role, current_setting('search_path')"
_STATE += " AS path, coalesce(current_setting('app.tenant_id', true), '') AS tenant"


async def _next_checkouts(
    database: TenantDatabase, tenant: Tenant
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """What the next clients find on every server: ``tenant``'s sessions, then no tenant's
    connections (their read fails: the error is kept in ``state["error"]``)."""

    async def as_tenant(barrier: asyncio.Barrier) -> dict[str, Any]:
        async with tenant_scope(tenant), database.session() as s:
            state = dict((await s.execute(text(_STATE))).mappings().one())
            await barrier.wait()
            state["names"] = list((await s.execute(text("SELECT name FROM projects"))).scalars())
            return state

    async def as_nobody(barrier: asyncio.Barrier) -> dict[str, Any]:
        async with database.engine.connect() as conn:
            state = dict((await conn.execute(text(_STATE))).mappings().one())
            await barrier.wait()
            try:
                rows = await conn.execute(text("SELECT name FROM projects"))
                state["names"] = list(rows.scalars())
            except ProgrammingError as exc:
                state["error"] = exc
            return state

    return (
        await _on_every_server(SERVER_POOL, as_tenant),
        await _on_every_server(SERVER_POOL, as_nobody),
    )


async def _attack(database: TenantDatabase, tenant: Tenant, *sql: str) -> tuple[int, Any]:
    """``sql`` in the tenant's transaction, then a read in a savepoint (so an error there does
    not undo what ``sql`` did), then COMMIT: session-level effects stay on that server."""
    async with tenant_scope(tenant), database.session() as s:
        pid = int(await s.scalar(text("SELECT pg_backend_pid()")) or 0)
        for statement in sql:
            await s.execute(text(statement))
        outcome: Any
        try:
            async with s.begin_nested():
                outcome = list((await s.execute(text("SELECT name FROM projects"))).scalars())
        except DBAPIError as exc:
            outcome = exc
        await s.commit()
        after = list((await s.execute(text("SELECT name FROM projects"))).scalars())
    assert after  # the session's next transaction: rebound, own rows only
    assert not foreign_rows(after, tenant.id)
    return pid, outcome


def _check_in_transaction(outcome: Any, expected: str, tenant: Tenant) -> None:
    if expected == "own":
        assert isinstance(outcome, list)
        assert outcome
        assert not foreign_rows(outcome, tenant.id)
    elif expected == "hole":  # documented limits: the unsigned setting, a path without roles
        assert isinstance(outcome, list)
        assert foreign_rows(outcome, tenant.id)
    else:
        assert isinstance(outcome, ProgrammingError), outcome
        assert expected in str(outcome)


def _check_clean(
    found: tuple[list[dict[str, Any]], list[dict[str, Any]]],
    attacked_pid: int,
    tenant: Tenant,
    tenant_state: tuple[str, str, str],
    nobody_error: str,
) -> None:
    tenants, nobodies = found
    assert {s["pid"] for s in tenants} == {s["pid"] for s in nobodies}
    assert attacked_pid in {s["pid"] for s in tenants}  # the attacked server was checked
    for state in tenants:
        assert (state["role"], state["path"], state["tenant"]) == tenant_state
        assert len(state["names"]) >= ROWS_PER_TENANT
        assert not foreign_rows(state["names"], tenant.id)
    for state in nobodies:
        assert (state["role"], state["path"], state["tenant"]) == (APP_ROLE, DEFAULT_PATH, "")
        assert "names" not in state
        assert nobody_error in str(state["error"])


DEFAULT_PATH = '"$user", public'


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("SELECT set_config('app.tenant_id', 'globex', true)", "hole"),
        ("SELECT set_config('app.tenant_id', 'globex', false)", "hole"),
        ("SELECT set_config('app.tenant_id', current_setting('app.tenant_id'), false)", "own"),
        ("SET app.tenant_id = 'acme'", "own"),
        (f"SET ROLE {OTHER_ROLE}", "own"),
        ("SET search_path = pg_catalog", "does not exist"),
        ("RESET ALL", "no tenant is bound"),
    ],
)
async def test_rls_raw_session_state_never_reaches_the_next_client(
    db: TenantDatabase, other_role: str, sql: str, expected: str
) -> None:
    pid, outcome = await _attack(db, ACME, sql)
    _check_in_transaction(outcome, expected, ACME)
    found = await _next_checkouts(db, INITECH)
    _check_clean(found, pid, INITECH, (APP_ROLE, DEFAULT_PATH, "initech"), "no tenant is bound")


@pytest.mark.parametrize(
    ("roles", "sql", "expected"),
    [
        (False, "SET search_path TO tenant_globex", "hole"),
        (False, "SELECT set_config('search_path', 'tenant_globex', false)", "hole"),
        (False, "RESET ALL", "does not exist"),
        (True, f"SET ROLE {schema_cases.ROLE_PREFIX}globex", "does not exist"),
        (True, "SET search_path TO rt_globex", "does not exist"),
        (True, "RESET ROLE", "does not exist"),
        (True, "RESET ALL", "does not exist"),
    ],
)
async def test_schema_raw_session_state_never_reaches_the_next_client(
    schema_db: TenantDatabase,
    schema_role_db: TenantDatabase,
    roles: bool,
    sql: str,
    expected: str,
) -> None:
    database = schema_role_db if roles else schema_db
    acme = schema_cases._role_tenant(ACME) if roles else ACME
    following, role, path = INITECH, APP_ROLE, "tenant_initech, pg_temp"
    if roles:  # only acme and globex have roles: acme follows its own attack on globex
        following = acme
        role, path = f"{schema_cases.ROLE_PREFIX}acme", "rt_acme, pg_temp"
    pid, outcome = await _attack(database, acme, sql)
    _check_in_transaction(outcome, expected, acme)
    found = await _next_checkouts(database, following)
    _check_clean(found, pid, following, (role, path, ""), "does not exist")


# -- the PgBouncer setting these cases stand on -----------------------------------------------


@pytest.fixture(scope="module")
def pgbouncer_without_reset(
    pg_server: PgServer, pgbouncer: bouncer.PgBouncer
) -> Iterator[bouncer.PgBouncer]:
    """PgBouncer's default for transaction pooling: no reset query between clients."""
    settings = {**bouncer.SETTINGS, "server_reset_query_always": "0"}
    with bouncer.running(pg_server, settings) as running:
        yield running


async def test_without_server_reset_query_always_raw_session_state_reaches_the_next_client(
    rls_database: PgDatabase,
    rls_strategy: RowLevelSecurity,
    other_role: str,
    pgbouncer_without_reset: bouncer.PgBouncer,
) -> None:
    """Why the documented settings include ``server_reset_query_always = 1``: without it the
    checks above fail, and a connection of no tenant reads the rows of the last one."""
    database = await _database(pgbouncer_without_reset, rls_database.name, rls_strategy)
    try:
        pid, _ = await _attack(
            database,
            ACME,
            "SELECT set_config('app.tenant_id', current_setting('app.tenant_id'), false)",
            f"SET ROLE {OTHER_ROLE}",
        )
        _, nobodies = await _next_checkouts(database, GLOBEX)
    finally:
        await database.dispose()
    left = [state for state in nobodies if state["pid"] == pid]
    assert left
    assert left[0]["tenant"] == "acme"
    assert left[0]["role"] == OTHER_ROLE
    assert len(left[0]["names"]) == ROWS_PER_TENANT
    assert not foreign_rows(left[0]["names"], "acme")  # acme's rows, and no tenant asked


# -- signed binding for transaction pooling: single-use tokens, any server connection -------


def _pooled_strategy() -> RowLevelSecurity:
    return RowLevelSecurity(
        metadata=Base.metadata,
        shared_tables={"currencies"},
        signed=True,
        signing_keys=[SIGNING_KEY],
        pooling="transaction",
    )


@pytest.fixture(scope="module")
def pooled_database(pg_server: PgServer) -> Iterator[PgDatabase]:
    db = create_database(pg_server, "pgbouncer_pooled")
    try:
        asyncio.run(set_up_rls(db.admin_url, _pooled_strategy()))
        asyncio.run(
            admin_run(
                db.admin_url,  # R020: no session of the app role shows its query text
                f'ALTER ROLE {APP_ROLE} IN DATABASE "{db.name}" SET track_activities = off',
            )
        )
        yield db
    finally:
        drop_database(pg_server, db)


async def test_pooled_signed_binding_serves_every_tenant_on_any_server_connection(
    pooled_database: PgDatabase, pgbouncer: bouncer.PgBouncer
) -> None:
    database = await _database(pgbouncer, pooled_database.name, _pooled_strategy())
    foreign: list[object] = []
    counts: list[int] = []

    async def request(i: int) -> None:
        tenant = TENANTS[i % 3]
        async with tenant_scope(tenant), database.session() as s:
            rows = (await s.scalars(select(Project.name))).all()
            foreign.extend(foreign_rows(rows, tenant.id))
            counts.append(len(rows))
            s.add(Project(tenant_id=tenant.id, id=7000 + i, name=f"{tenant.id}-pooled-{i}"))
            await s.commit()

    try:
        await asyncio.gather(*(request(i) for i in range(3 * CLIENTS)))
    finally:
        await database.dispose()
    engine = create_async_engine(pooled_database.admin_url)
    try:
        async with engine.connect() as conn:
            written = (
                await conn.execute(text("SELECT tenant_id, name FROM projects WHERE id >= 7000"))
            ).all()
            await conn.execute(text("DELETE FROM projects WHERE id >= 7000"))
            await conn.commit()
    finally:
        await engine.dispose()
    assert foreign == []
    assert min(counts) >= ROWS_PER_TENANT
    assert len(written) == 3 * CLIENTS
    assert all(name.startswith(f"{tenant}-pooled-") for tenant, name in written)


async def test_a_pooled_token_is_single_use_and_expires(
    pooled_database: PgDatabase, pgbouncer: bouncer.PgBouncer, monkeypatch: pytest.MonkeyPatch
) -> None:
    strategy = _pooled_strategy()
    signer = strategy.signer
    assert signer is not None
    database = await _database(pgbouncer, pooled_database.name, strategy, clients=2)
    sent: list[str] = []
    monkeypatch.setattr(signer, "token", _recording(signer.token, sent))
    try:
        async with tenant_scope(ACME), database.session() as s:
            assert len((await s.scalars(select(Project.name))).all()) >= ROWS_PER_TENANT
            await s.commit()  # the spent nonce is committed with the transaction
        issued = int(sent[-1].split(":")[1])
        old = f"acme:{issued - 600_000_000}:{'ab' * 12}"
        expired = f"{old}:{mac(signer.keys[0], old)}"
        for token, reason in ((sent[-1], "used before"), (expired, "expired")):
            async with tenant_scope(GLOBEX), database.session() as s:
                await s.execute(text(f"SELECT {signer.bind_function}(:t)"), {"t": token})
                with pytest.raises(DBAPIError, match=reason):
                    await s.execute(text("SELECT name FROM projects"))
    finally:
        await database.dispose()


def _recording(token: Callable[..., str], sent: list[str]) -> Callable[..., str]:
    def record(*args: Any) -> str:
        sent.append(token(*args))
        return sent[-1]

    return record


async def test_a_pooled_binding_refuses_read_only_transactions_with_the_reason(
    pooled_database: PgDatabase, pgbouncer: bouncer.PgBouncer
) -> None:
    database = await _database(pgbouncer, pooled_database.name, _pooled_strategy(), clients=2)
    try:
        async with tenant_scope(ACME), database.session() as s:
            await s.connection(execution_options={"postgresql_readonly": True})
            with pytest.raises(DBAPIError, match="read-write transaction"):
                await s.execute(text("SELECT name FROM projects"))
    finally:
        await database.dispose()


async def test_validate_requires_hidden_query_text_behind_transaction_pooling(
    pg_server: PgServer, pgbouncer: bouncer.PgBouncer
) -> None:
    db = await asyncio.to_thread(create_database, pg_server, "pgbouncer_shown")
    try:  # installed for transaction pooling, but the app role's query text is shown
        await set_up_rls(db.admin_url, _pooled_strategy())
        with pytest.raises(IsolationConfigError, match="R020"):
            await _database(pgbouncer, db.name, _pooled_strategy())
    finally:
        await asyncio.to_thread(drop_database, pg_server, db)


async def test_a_rolled_back_pooled_token_binds_again_within_its_window(
    pooled_database: PgDatabase, pgbouncer: bouncer.PgBouncer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Documented limit: the spent nonce is written in the transaction it binds, so a
    transaction that rolls back un-spends it until the token expires. Nobody can see a token
    (R020, and the server reset after every transaction), so nobody can replay it; this test
    keeps the documentation honest."""
    strategy = _pooled_strategy()
    signer = strategy.signer
    assert signer is not None
    database = await _database(pgbouncer, pooled_database.name, strategy, clients=2)
    sent: list[str] = []
    monkeypatch.setattr(signer, "token", _recording(signer.token, sent))
    try:
        async with tenant_scope(ACME), database.session() as s:
            await s.scalars(select(Project.name))  # closed: rolled back
        async with tenant_scope(GLOBEX), database.session() as s:
            await s.execute(text(f"SELECT {signer.bind_function}(:t)"), {"t": sent[0]})
            names = (await s.execute(text("SELECT name FROM projects"))).scalars().all()
    finally:
        await database.dispose()
    assert names
    assert all(name.startswith("acme-") for name in names)
