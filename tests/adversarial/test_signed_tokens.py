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

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from asgi_tenancy import tenant_scope
from asgi_tenancy.sqlalchemy import TenantDatabase
from asgi_tenancy.sqlalchemy._asyncpg import TenancyConnection
from asgi_tenancy.sqlalchemy.rls.signing import Signer
from tests.adversarial.deployments import Deployment, deployed
from tests.conftest import APP_ROLE, PgServer

_TOKEN = re.compile(r"tenancy_bind\('([^']+)'\)")


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

    def spy(self: TenancyConnection, binding: str | None) -> None:
        if binding:
            tokens.extend(_TOKEN.findall(binding))
        original(self, binding)

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
    """globex's transaction binds acme's token and reads acme's rows; what it read."""
    bind = text(f"SELECT {_signer(db).bind_function}(:token)")
    async with tenant_scope(deployment.tenants["globex"]), db.session() as s:
        for statement in before:
            await s.execute(text(statement))
        await s.execute(bind, {"token": token})
        table = _items(deployment, "acme")
        return list((await s.execute(text(f"SELECT body FROM {table}"))).scalars())


async def _refused(coroutine: object, reason: str) -> None:
    with pytest.raises(DBAPIError, match=reason):
        await coroutine  # type: ignore[misc]


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
        await _refused(_replay(other, deployment, captured[-1]), "another connection")
    finally:
        await other.dispose()


async def test_a_future_counter_with_a_forged_mac_is_refused(
    database: TenantDatabase, deployment: Deployment, captured: list[str]
) -> None:
    await _acme_request(database, deployment)
    tenant, session, counter, _ = captured[-1].split(":")
    forged = f"{tenant}:{session}:{int(counter) + 10}:{'0' * 64}"
    await _refused(_replay(database, deployment, forged), "not signed by a known key")


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

    await _refused(copy(), "not signed for this transaction")


@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    forged=st.one_of(
        st.text(alphabet="acmeglobx0123456789:abcdef!-_.", max_size=120),
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
                    text("SELECT query FROM pg_stat_activity WHERE query LIKE '%tenancy_bind(%'")
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
    assert all(t.count(":") == 3 for t in seen)


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
    """The bind function is callable by the app role; without a valid token it binds nothing."""
    engine = create_async_engine(database.engine.url.render_as_string(hide_password=False))
    try:
        async with AsyncSession(engine) as s:
            bind = text(f"SELECT {_signer(database).bind_function}(:token)")
            await s.execute(bind, {"token": "acme:x:1:y"})
            with pytest.raises(DBAPIError, match="asgi-tenancy"):
                await s.execute(text(f"SELECT body FROM {_items(deployment, 'acme')}"))
    finally:
        await engine.dispose()
    assert APP_ROLE in database.engine.url.render_as_string()
