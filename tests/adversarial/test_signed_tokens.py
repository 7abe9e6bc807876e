"""The signed binding is single-use and bound to its connection: a token seen or captured is
worthless. Under RLS signed and the hardened schema mode (the same signer), as the app role.

Tokens are captured the strongest way: from inside the process, as the driver sends them (what
an attacker reading ``pg_stat_activity`` or a planted object would get), and also really read
from ``pg_stat_activity`` while other tenants' requests run. Each is replayed in another
tenant's transaction: on the same connection, on another, after a rollback, after ``DISCARD``.
The answer is an error, never a row of the token's tenant (read back as the admin).
"""

from __future__ import annotations

import asyncio
import contextvars
import re
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from asgi_tenancy import tenant_scope
from asgi_tenancy.errors import DatabaseUnavailable
from asgi_tenancy.sqlalchemy import TenantDatabase
from asgi_tenancy.sqlalchemy._asyncpg import TenancyConnection
from asgi_tenancy.sqlalchemy.rls.signing import Signer
from asgi_tenancy.sqlalchemy.rls.signing_checks import check_signer
from tests.adversarial.deployments import Deployment, deployed
from tests.conftest import APP_ROLE, PgServer, admin_run

_TOKEN = re.compile(r"= '([^':]+:[0-9]+:[0-9a-f]{64})'")


@pytest.fixture(scope="module", params=["row-signed", "schema-hardened"])
def deployment(pg_server: PgServer, request: pytest.FixtureRequest) -> Iterator[Deployment]:
    yield from deployed(pg_server, request.param)


@pytest.fixture
async def database(deployment: Deployment) -> AsyncIterator[TenantDatabase]:
    db = deployment.make()
    await db.validate()
    yield db
    await db.dispose()


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every token the driver sends, as it sends it."""
    tokens: list[str] = []
    original = TenancyConnection.set_pending_binding

    def spy(self: TenancyConnection, binding: str | None, *more: Any) -> None:
        if binding:
            tokens.extend(_TOKEN.findall(binding))
        original(self, binding, *more)

    monkeypatch.setattr(TenancyConnection, "set_pending_binding", spy)
    return tokens


def _signer(db: TenantDatabase) -> Signer:
    signer = getattr(db.strategy, "signer", None)
    assert isinstance(signer, Signer)
    return signer


def _items(deployment: Deployment, tenant: str) -> str:
    return "items" if deployment.kind.startswith("row") else f"tenant_{tenant}.items"


async def _acme_request(db: TenantDatabase, deployment: Deployment) -> None:
    async with tenant_scope(deployment.tenants["acme"]), db.session() as s:
        assert len((await s.execute(text("SELECT body FROM items"))).all()) > 0


async def _replay(
    db: TenantDatabase, deployment: Deployment, token: str, *before: str
) -> list[str]:
    """globex's transaction sets acme's token and reads acme's rows; what it read."""
    bind = text("SELECT set_config(:setting, :token, true)").bindparams(setting=_signer(db).setting)
    async with tenant_scope(deployment.tenants["globex"]), db.session() as s:
        for statement in before:
            await s.execute(text(statement))
        await s.execute(bind, {"token": token})
        table = _items(deployment, "acme")
        return list((await s.execute(text(f"SELECT body FROM {table}"))).scalars())


async def _refused(coroutine: object, reason: str) -> None:
    """The server refused, saying ``reason``: as the driver's error, or as the
    ``DatabaseUnavailable`` of a connection that can bind no more (SQLSTATE 08T01)."""
    with pytest.raises((DBAPIError, DatabaseUnavailable)) as refused:
        await coroutine  # type: ignore[misc]
    error = refused.value
    if isinstance(error, DatabaseUnavailable):
        error = error.__cause__  # type: ignore[assignment]
        assert isinstance(error, DBAPIError)
        assert getattr(error.orig, "sqlstate", None) == "08T01"
    assert re.search(reason, str(error))


async def test_a_token_replayed_on_its_own_connection_was_used_before(
    database: TenantDatabase, deployment: Deployment, captured: list[str]
) -> None:
    await _acme_request(database, deployment)
    await _refused(_replay(database, deployment, captured[-1]), "used before")


async def test_a_token_replayed_after_its_transaction_rolled_back_was_used_before(
    database: TenantDatabase, deployment: Deployment, captured: list[str]
) -> None:
    async with tenant_scope(deployment.tenants["acme"]), database.session() as s:
        await s.execute(text("SELECT 1"))
        await s.rollback()  # the counter is a sequence: it does not roll back
    await _refused(_replay(database, deployment, captured[-1]), "used before")


async def test_a_token_replayed_on_another_connection_belongs_to_another(
    database: TenantDatabase, deployment: Deployment, captured: list[str]
) -> None:
    await _acme_request(database, deployment)
    other = deployment.make()
    await other.validate()
    try:
        await _refused(_replay(other, deployment, captured[-1]), "not signed for this connection")
    finally:
        await other.dispose()


async def test_a_future_counter_with_a_forged_mac_is_refused(
    database: TenantDatabase, deployment: Deployment, captured: list[str]
) -> None:
    await _acme_request(database, deployment)
    tenant, counter, _ = captured[-1].split(":")
    forged = f"{tenant}:{int(counter) + 10}:{'0' * 64}"
    await _refused(_replay(database, deployment, forged), "not signed for this connection")


async def test_discard_removes_the_signing_session_and_every_later_bind_fails(
    database: TenantDatabase, deployment: Deployment, captured: list[str]
) -> None:
    await _acme_request(database, deployment)
    await _refused(_replay(database, deployment, captured[-1], "DISCARD TEMP"), "signing session")


async def test_the_bound_setting_copied_into_another_transaction_is_worthless(
    database: TenantDatabase, deployment: Deployment
) -> None:
    async with tenant_scope(deployment.tenants["acme"]), database.session() as s:
        bound = await s.scalar(text("SELECT current_setting('app.tenant_id')"))
    assert str(bound).startswith("acme:")

    async def copy() -> list[str]:
        async with tenant_scope(deployment.tenants["globex"]), database.session() as s:
            await s.execute(text("SELECT set_config('app.tenant_id', :b, true)"), {"b": bound})
            table = _items(deployment, "acme")
            return list((await s.execute(text(f"SELECT body FROM {table}"))).scalars())

    await _refused(copy(), "used before")


@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    forged=st.one_of(
        st.text(alphabet="acmeglobx0123456789:abcdef!-_.", max_size=120),
        st.builds(
            lambda t, c, m: f"{t}:{c}:{m}",
            st.sampled_from(["acme", "globex", "", "acme:"]),
            st.integers(min_value=-5, max_value=2**70).map(str),
            st.text(alphabet="0123456789abcdef", min_size=64, max_size=64),
        ),
        st.builds(
            lambda t, s, c, m: f"{t}:{s}:{c}:{m}",
            st.sampled_from(["acme", "globex", "", "acme:"]),
            st.text(alphabet="0123456789abcdef", max_size=64),
            st.integers(min_value=-5, max_value=2**70).map(str),
            st.text(alphabet="0123456789abcdef", min_size=64, max_size=64),
        ),
    )
)
async def test_no_forged_token_binds_anything(
    database: TenantDatabase, deployment: Deployment, forged: str
) -> None:
    with pytest.raises(DBAPIError) as refused:
        await _replay(database, deployment, forged)
    assert getattr(refused.value.orig, "sqlstate", None) == "42501"


async def test_tokens_read_from_pg_stat_activity_open_nothing(
    database: TenantDatabase, deployment: Deployment
) -> None:
    """Other requests run while a globex request polls what every session of the app role can
    see; every token it catches is replayed, in its own transaction, and refused."""
    others = [deployment.make() for _ in range(2)]
    for other in others:
        await other.validate()
    stop = asyncio.Event()

    async def victims(db: TenantDatabase) -> None:
        while not stop.is_set():
            await _acme_request(db, deployment)

    tasks = [asyncio.create_task(victims(db), context=contextvars.Context()) for db in others]
    seen: set[str] = set()
    try:
        for _ in range(300):
            async with tenant_scope(deployment.tenants["globex"]), database.session() as s:
                rows = await s.execute(
                    text("SELECT query FROM pg_stat_activity WHERE query LIKE '%SET LOCAL%'")
                )
                seen.update(t for q in rows.scalars() for t in _TOKEN.findall(q or ""))
            if len(seen) >= 5:
                break
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        for other in others:
            await other.dispose()
    stolen = [t for t in seen if t.startswith("acme:")]
    for token in stolen:
        with pytest.raises(DBAPIError):
            await _replay(database, deployment, token)
    # The poll may catch none in a quiet run; the capture tests above hold either way.
    assert all(t.count(":") == 2 for t in seen)


async def test_read_only_transactions_bind(
    database: TenantDatabase, deployment: Deployment
) -> None:
    async with tenant_scope(deployment.tenants["acme"]), database.session() as s:
        await s.connection(execution_options={"postgresql_readonly": True})
        bodies = list((await s.execute(text("SELECT body FROM items ORDER BY id"))).scalars())
        assert await s.scalar(text("SELECT current_setting('transaction_read_only')")) == "on"
    assert bodies
    assert all(b.startswith("acme-") for b in bodies)


async def test_a_raw_session_in_scope_binds_nothing(
    database: TenantDatabase, deployment: Deployment
) -> None:
    """A connection without a signing session: a token set by hand binds nothing."""
    engine = create_async_engine(database.engine.url.render_as_string(hide_password=False))
    try:
        async with AsyncSession(engine) as s:
            bind = text("SELECT set_config(:setting, :token, true)")
            await s.execute(bind, {"setting": _signer(database).setting, "token": "acme:1:y"})
            with pytest.raises(DBAPIError, match="asgi-tenancy"):
                await s.execute(text(f"SELECT body FROM {_items(deployment, 'acme')}"))
    finally:
        await engine.dispose()
    assert APP_ROLE in database.engine.url.render_as_string()


_MOVES = [
    "SELECT nextval('pg_temp.tenancy_counter')",
    "SELECT nextval('tenancy_counter'), nextval('tenancy_counter')",
    "SELECT setval('pg_temp.tenancy_counter', 1)",
    "SELECT setval('pg_temp.tenancy_key_1', 1)",
    "ALTER SEQUENCE pg_temp.tenancy_counter RESTART WITH 1",
    "DROP SEQUENCE pg_temp.tenancy_counter",
    "DELETE FROM pg_temp.tenancy_session",
    "DISCARD SEQUENCES",
    "DISCARD TEMP",
    "SELECT last_value FROM pg_temp.tenancy_key_1",
    "SELECT pg_sequence_last_value('pg_temp.tenancy_key_1')",
]


@pytest.mark.parametrize("move", _MOVES)
async def test_raw_sql_on_the_signing_session_never_opens_another_tenant(
    database: TenantDatabase, deployment: Deployment, captured: list[str], move: str
) -> None:
    """Each move on the signing session's objects, in acme's transaction (then acme's last
    token bound by hand): no row of globex is read, and the pool's one connection serves the
    next requests of both tenants with their own rows (replaced when the move broke it)."""
    table = _items(deployment, "globex")
    read: list[str] = []
    async with tenant_scope(deployment.tenants["acme"]), database.session() as s:
        await s.execute(text("SELECT 1"))
        try:
            async with s.begin_nested():
                await s.execute(text(move))
        except DBAPIError:
            pass  # refused by the server: what counts is what follows
        try:
            async with s.begin_nested():
                await s.execute(
                    text("SELECT set_config(:setting, :token, true)"),
                    {"setting": _signer(database).setting, "token": captured[-1]},
                )
                read = list((await s.execute(text(f"SELECT body FROM {table}"))).scalars())
        except (DBAPIError, DatabaseUnavailable):
            pass
    assert not [body for body in read if body.startswith("globex")]
    for name in ("globex", "acme", "globex"):
        async with tenant_scope(deployment.tenants[name]), database.session() as s:
            try:
                bodies = list((await s.execute(text("SELECT body FROM items"))).scalars())
            except DatabaseUnavailable:  # the move left the connection unusable: replaced
                bodies = list((await s.execute(text("SELECT body FROM items"))).scalars())
        assert bodies
        assert all(body.startswith(f"{name}-") for body in bodies)


async def test_without_temporary_no_one_can_rebuild_the_signing_session(
    database: TenantDatabase, deployment: Deployment, captured: list[str]
) -> None:
    """R018 holds the app role to no temporary object: after DISCARD TEMP it cannot make the
    counter or the session key its own, so the token it knows binds nothing."""
    await _acme_request(database, deployment)
    for make in (
        "CREATE TEMPORARY SEQUENCE tenancy_counter",
        "CREATE TEMPORARY SEQUENCE tenancy_key_1",
        "CREATE TEMPORARY TABLE tenancy_session (session_id text)",
    ):
        await _refused(
            _replay(database, deployment, captured[-1], "DISCARD TEMP", make), "permission denied"
        )


async def test_a_begin_that_cannot_draw_its_counter_replaces_the_connection(
    database: TenantDatabase, deployment: Deployment
) -> None:
    """The counter gone between two requests (dropped by the admin): the next BEGIN message
    fails, so that request gets the 503 of a lost connection, the server is left in no
    transaction, and the one after runs on a fresh connection with its own rows."""
    async with tenant_scope(deployment.tenants["acme"]), database.session() as s:
        pid = await s.scalar(text("SELECT pg_backend_pid()"))
        schema = await s.scalar(text("SELECT pg_my_temp_schema()::regnamespace::text"))
    await admin_run(deployment.admin_urls["acme"], f"DROP SEQUENCE {schema}.tenancy_counter")
    with pytest.raises(DatabaseUnavailable):
        async with tenant_scope(deployment.tenants["globex"]), database.session() as s:
            await s.execute(text("SELECT body FROM items"))
    async with tenant_scope(deployment.tenants["globex"]), database.session() as s:
        bodies = list((await s.execute(text("SELECT body FROM items"))).scalars())
        assert await s.scalar(text("SELECT pg_backend_pid()")) != pid
    assert bodies
    assert all(body.startswith("globex-") for body in bodies)


@pytest.mark.parametrize(
    "read",
    [
        "SELECT last_value FROM pg_temp.tenancy_key_1",
        "SELECT * FROM pg_temp.tenancy_key_2",
        "SELECT pg_sequence_last_value('pg_temp.tenancy_key_1')",
        "SELECT last_value FROM pg_sequences WHERE sequencename LIKE 'tenancy_key%'",
        "SELECT currval('pg_temp.tenancy_key_1')",
        "SELECT nextval('pg_temp.tenancy_key_2')",
        "SELECT * FROM pg_temp.tenancy_session",
    ],
)
async def test_the_session_key_cannot_be_read(
    database: TenantDatabase, deployment: Deployment, read: str
) -> None:
    """The session key lives in two of the owner's sequences: the app role gets no value of
    them (an error, or the view's NULL for a sequence it may not read)."""
    refused: str | None = None
    values: list[object] = []
    async with tenant_scope(deployment.tenants["acme"]), database.session() as s:
        try:
            async with s.begin_nested():
                values = [v for v in (await s.execute(text(read))).scalars() if v is not None]
        except DBAPIError as exc:
            refused = getattr(exc.orig, "sqlstate", None)
    assert values == []
    assert refused in {None, "42501", "55000"}  # none: pg_sequences shows NULL, not the value


async def test_validate_finds_a_signing_session_the_app_role_can_read(
    database: TenantDatabase, deployment: Deployment
) -> None:
    """The test database's owner grants the app role SELECT on every new sequence by default:
    the signing session takes that back (the test above), and R023 finds it where it was not
    (granted again here, as the admin, on a live connection's session)."""
    async with database.engine.connect() as conn:
        assert await check_signer(_signer(database), conn) == []
        schema = await conn.scalar(text("SELECT pg_my_temp_schema()::regnamespace::text"))
        await conn.commit()  # the grant below reaches this session's catalog cache in a new one
        await admin_run(
            deployment.admin_urls["acme"],
            f"GRANT SELECT ON SEQUENCE {schema}.tenancy_key_1 TO {APP_ROLE}",
        )
        findings = await check_signer(_signer(database), conn)
    assert [f.code for f in findings] == ["R023"]
