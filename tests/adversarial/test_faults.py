"""Faults answer as faults: through FastAPI on a real PostgreSQL, every database failure the
server or the driver can produce is a problem+json 503/504 with a stable code and Retry-After,
logged once with its cause; a failing cleanup after the response is logged and swallowed; a
stream holds its connection before its status; and the next request on the pool is served.

Backends are killed with ``pg_terminate_backend`` from an admin connection; nothing is mocked.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Annotated, Any

import asyncpg
import httpx
import pytest
from fastapi import Depends, FastAPI
from fastapi.responses import StreamingResponse
from sqlalchemy import exc as sa_exc
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from asgi_tenancy import HeaderResolver, InMemoryTenantStore, TenancyMiddleware, Tenant
from asgi_tenancy.errors import DatabaseUnavailable
from asgi_tenancy.fastapi import setup_tenancy, tenant_session
from asgi_tenancy.sqlalchemy import RowLevelSecurity, TenantDatabase
from asgi_tenancy.sqlalchemy._asyncpg import TenancyConnection
from asgi_tenancy.sqlalchemy.failures import translate
from tests.adversarial.models import ROWS_PER_TENANT, Base, Project
from tests.conftest import PgDatabase

HEADERS = {"x-tenant-id": "acme"}
Session = Annotated[AsyncSession, Depends(tenant_session)]


@pytest.fixture(scope="module")
def rls_strategy() -> RowLevelSecurity:
    return RowLevelSecurity(metadata=Base.metadata, shared_tables={"currencies"})


@dataclass
class Probe:
    """What the endpoints tell the test: the backend pid of a request, and when it is there."""

    admin: AsyncEngine
    pid: int | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def kill(self, pid: int | None = None) -> None:
        async with self.admin.connect() as conn:
            await conn.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid or self.pid})

    async def kill_and_wait(self, pid: int) -> None:
        """Kill ``pid`` and wait until it has left ``pg_stat_activity`` (it sent its FATAL)."""
        await self.kill(pid)
        async with self.admin.connect() as conn:
            async with asyncio.timeout(10):
                while await conn.scalar(
                    text("SELECT count(*) FROM pg_stat_activity WHERE pid = :p"), {"p": pid}
                ):
                    await conn.rollback()  # a fresh snapshot of pg_stat_activity

    async def kill_when_sleeping(self) -> None:
        """Kill the request's backend once it is inside ``pg_sleep`` (mid-query)."""
        await self.ready.wait()
        async with self.admin.connect() as conn:
            async with asyncio.timeout(10):
                while not await conn.scalar(
                    text(
                        "SELECT count(*) FROM pg_stat_activity "
                        "WHERE pid = :p AND wait_event = 'PgSleep'"
                    ),
                    {"p": self.pid},
                ):
                    await conn.rollback()  # a fresh snapshot of pg_stat_activity
        await self.kill()


def _app(database: TenantDatabase, probe: Probe) -> FastAPI:
    app = FastAPI()
    app.add_middleware(
        TenancyMiddleware, resolvers=[HeaderResolver()], store=InMemoryTenantStore([Tenant("acme")])
    )
    setup_tenancy(app, database=database)

    async def publish_pid(session: AsyncSession) -> None:
        probe.pid = int(await session.scalar(text("SELECT pg_backend_pid()")) or 0)
        probe.ready.set()

    @app.get("/count")
    async def count(session: Session) -> int:
        return len((await session.scalars(select(Project))).all())

    @app.get("/pid")
    async def pid(session: Session) -> int:
        await publish_pid(session)
        return probe.pid or 0

    @app.get("/sleep")
    async def sleep(session: Session) -> int:
        await publish_pid(session)
        await session.execute(text("SELECT pg_sleep(30)"))
        return 0

    @app.get("/hold")
    async def hold(session: Session) -> int:
        await session.execute(text("SELECT 1"))  # its connection is taken, and kept
        probe.ready.set()
        await probe.release.wait()
        return 0

    @app.get("/unused")
    async def unused(session: Session) -> int:
        probe.ready.set()
        await probe.release.wait()
        return 0

    @app.get("/timeout")
    async def timeout(session: Session) -> int:
        await session.execute(text("SELECT set_config('statement_timeout', '50ms', true)"))
        await session.execute(text("SELECT pg_sleep(5)"))
        return 0

    @app.get("/conflict/{state}")
    async def conflict(state: str, session: Session) -> int:
        assert state in ("40001", "40P01")
        await session.execute(
            text(f"DO $$ BEGIN RAISE EXCEPTION USING ERRCODE = '{state}'; END $$")
        )
        return 0

    @app.get("/suicide")
    async def suicide(session: Session) -> int:
        """Answers 200, then its backend dies before the session's rollback."""
        rows = len((await session.scalars(select(Project))).all())
        await publish_pid(session)
        await probe.kill()
        return rows

    @app.get("/stream")
    async def stream(session: Session) -> StreamingResponse:
        async def rows() -> AsyncIterator[str]:
            for project in await session.scalars(select(Project).order_by(Project.id)):
                yield f"{project.id}\n"

        return StreamingResponse(rows(), media_type="text/plain")

    @app.get("/stream-dies")
    async def stream_dies(session: Session) -> StreamingResponse:
        async def rows() -> AsyncIterator[str]:
            yield "first\n"
            await publish_pid(session)
            await probe.kill()
            await session.execute(text("SELECT 1"))
            yield "never\n"

        return StreamingResponse(rows(), media_type="text/plain")

    return app


@pytest.fixture
async def served(
    rls_database: PgDatabase, rls_strategy: RowLevelSecurity, admin_engine: AsyncEngine
) -> AsyncIterator[tuple[httpx.AsyncClient, Probe, TenantDatabase]]:
    database = TenantDatabase(
        rls_database.app_url,
        rls_strategy,
        engine_options={"pool_size": 1, "max_overflow": 0, "pool_timeout": 0.3},
    )
    probe = Probe(admin_engine)
    app = _app(database, probe)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            yield client, probe, database


def _assert_problem(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["code"] == code
    assert response.headers["retry-after"] == "1"


async def _healthy(client: httpx.AsyncClient) -> None:
    response = await client.get("/count", headers=HEADERS)
    assert response.status_code == 200
    assert response.json() == ROWS_PER_TENANT


def _tenancy_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name.startswith("asgi_tenancy") and r.levelno >= logging.WARNING
    ]


async def test_a_backend_killed_mid_query_is_503_logged_once_and_the_pool_heals(
    served: tuple[httpx.AsyncClient, Probe, TenantDatabase], caplog: pytest.LogCaptureFixture
) -> None:
    client, probe, _ = served
    killer = asyncio.create_task(probe.kill_when_sleeping())
    response = await client.get("/sleep", headers=HEADERS)
    await killer
    _assert_problem(response, 503, "database_unavailable")
    records = _tenancy_records(caplog)
    assert len(records) == 1
    assert records[0].exc_info is not None
    assert records[0].exc_info[1] is not None
    assert records[0].exc_info[1].__cause__ is not None  # the driver's error, for operators
    await _healthy(client)


async def test_a_backend_killed_between_requests_is_replaced_at_checkout(
    served: tuple[httpx.AsyncClient, Probe, TenantDatabase],
) -> None:
    client, probe, _ = served
    first = await client.get("/pid", headers=HEADERS)
    await probe.kill_and_wait(first.json())
    # The pooled connection was ended by the server while idle: its checkout replaces it with
    # a fresh one (bound like any), so no statement of the endpoint fails.
    second = await client.get("/pid", headers=HEADERS)
    assert second.status_code == 200
    assert second.json() != first.json()
    await _healthy(client)


async def test_a_statement_timeout_is_504(
    served: tuple[httpx.AsyncClient, Probe, TenantDatabase],
) -> None:
    client, _, _ = served
    _assert_problem(await client.get("/timeout", headers=HEADERS), 504, "database_timeout")
    await _healthy(client)


@pytest.mark.parametrize("state", ["40001", "40P01"])
async def test_a_serialization_failure_or_deadlock_is_503_conflict(
    served: tuple[httpx.AsyncClient, Probe, TenantDatabase], state: str
) -> None:
    client, _, _ = served
    response = await client.get(f"/conflict/{state}", headers=HEADERS)
    _assert_problem(response, 503, "database_conflict")
    await _healthy(client)


async def test_a_cleanup_that_fails_after_the_response_is_logged_and_swallowed(
    served: tuple[httpx.AsyncClient, Probe, TenantDatabase], caplog: pytest.LogCaptureFixture
) -> None:
    client, _, _ = served
    response = await client.get("/suicide", headers=HEADERS)  # raised into the client if leaked
    assert response.status_code == 200
    assert response.json() == ROWS_PER_TENANT
    assert any("releasing a tenant session failed" in r.getMessage() for r in caplog.records)
    await _healthy(client)


async def test_a_stream_on_an_exhausted_pool_is_a_503_before_any_byte(
    served: tuple[httpx.AsyncClient, Probe, TenantDatabase],
) -> None:
    client, probe, _ = served
    holder = asyncio.create_task(client.get("/hold", headers=HEADERS))
    await probe.ready.wait()
    try:
        busy = await client.get("/stream", headers=HEADERS)
    finally:
        probe.release.set()
        assert (await holder).status_code == 200
    assert busy.status_code == 503
    assert busy.headers["content-type"] == "application/problem+json"
    assert busy.json()["code"] == "tenant_capacity_exceeded"
    streamed = await client.get("/stream", headers=HEADERS)
    assert streamed.status_code == 200
    assert streamed.text.splitlines() == [str(i) for i in range(1, ROWS_PER_TENANT + 1)]


async def test_a_session_the_endpoint_never_uses_takes_no_connection(
    served: tuple[httpx.AsyncClient, Probe, TenantDatabase], admin_engine: AsyncEngine
) -> None:
    client, probe, _ = served
    idle = asyncio.create_task(client.get("/unused", headers=HEADERS))
    await probe.ready.wait()
    try:
        # The pool holds one connection: the waiting request must not have it.
        await _healthy(client)
    finally:
        probe.release.set()
    assert (await idle).status_code == 200
    async with admin_engine.connect() as conn:  # and its response did not take one either
        busy = await conn.scalar(
            text(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE usename = 'tenancy_app' AND state LIKE 'idle in transaction%'"
            )
        )
    assert busy == 0


async def test_a_stream_whose_backend_dies_after_the_first_byte_is_cut_and_releases(
    served: tuple[httpx.AsyncClient, Probe, TenantDatabase], caplog: pytest.LogCaptureFixture
) -> None:
    client, _, _ = served
    # After the status, the only honest end is an aborted body: the server is told by the
    # exception (uvicorn then closes the connection, so the client sees an incomplete body).
    with pytest.raises(Exception) as raised:  # noqa: PT011 (what the ASGI transport re-raises)
        await client.get("/stream-dies", headers=HEADERS)
    assert isinstance(translate(raised.value.__cause__ or raised.value), DatabaseUnavailable)
    assert _tenancy_records(caplog)  # logged, with the cause
    await _healthy(client)  # the pool of one connection was released and heals


async def test_closed_by_server_sees_a_terminated_idle_connection_and_only_that(
    rls_database: PgDatabase, admin_engine: AsyncEngine
) -> None:
    dsn = rls_database.app_url.replace("postgresql+asyncpg://", "postgresql://", 1)
    live = await asyncpg.connect(dsn, connection_class=TenancyConnection)
    doomed = await asyncpg.connect(dsn, connection_class=TenancyConnection)
    try:
        assert not live.closed_by_server()
        assert not doomed.closed_by_server()
        # As in a checkout right after the kill: the event loop has not read the socket yet,
        # so the driver does not know; the FATAL message and the hang-up wait in the socket.
        doomed._transport.pause_reading()
        await Probe(admin_engine).kill_and_wait(doomed.get_server_pid())
        assert not doomed.is_closed()
        assert doomed.closed_by_server()
        assert not live.closed_by_server()
        assert await live.fetchval("SELECT 1") == 1
        assert not live.closed_by_server()  # an answered statement leaves nothing unread
    finally:
        await live.close()
        doomed.terminate()
    assert live.closed_by_server()  # closed by us counts too: it must not be checked out


# -- the driver's conditions, one by one: what asyncpg raises when a connection breaks ----------


def _adapted(error: BaseException) -> sa_exc.DBAPIError:
    """``error`` as SQLAlchemy hands it over: a DBAPIError wrapping the adapter's, caused by it."""
    adapter = Exception(str(error))
    adapter.__cause__ = error
    return sa_exc.DBAPIError("SELECT 1", None, adapter)


@pytest.mark.parametrize(
    "error",
    [
        asyncpg.exceptions.InterfaceError("cannot switch to state 12; another operation (2) is"),
        # What the protocol itself raises when a backend dies mid-operation (seen under load,
        # in DatabasePerTenant's identity check on a new connection).
        asyncpg.exceptions.InternalClientError(
            "cannot switch to state 11; another operation (2) is in progress"
        ),
        asyncpg.exceptions.InterfaceError(
            "cannot perform operation: another operation is in progress"
        ),
        asyncpg.exceptions.InterfaceError("cannot perform operation: connection is closed"),
        asyncpg.exceptions.InterfaceError(
            "cannot call Transaction.rollback(): the underlying connection is closed"
        ),
        asyncpg.exceptions.ConnectionDoesNotExistError(
            "connection was closed in the middle of operation"
        ),
        ConnectionRefusedError(111, "Connect call failed"),
        ConnectionResetError(104, "Connection reset by peer"),
        TimeoutError(),
    ],
    ids=repr,
)
def test_every_broken_connection_condition_is_unavailable(error: BaseException) -> None:
    assert isinstance(translate(_adapted(error)), DatabaseUnavailable)
    assert isinstance(translate(error), DatabaseUnavailable)


def test_other_internal_client_errors_stay_the_applications() -> None:
    misuse = asyncpg.exceptions.InternalClientError("cannot use Connection.transaction() here")
    assert translate(_adapted(misuse)) is None


def test_a_transaction_whose_connection_was_invalidated_is_unavailable() -> None:
    error = sa_exc.PendingRollbackError("Can't reconnect until invalid transaction", code="8s2b")
    assert isinstance(translate(error), DatabaseUnavailable)
    other = sa_exc.PendingRollbackError("This Session's transaction has been rolled back")
    assert translate(other) is None  # an application's own misuse stays a 500


async def test_a_refused_connection_is_unavailable() -> None:
    engine = create_async_engine("postgresql+asyncpg://nobody@127.0.0.1:9/none")
    try:
        with pytest.raises(Exception) as raised:  # noqa: PT011
            async with engine.connect():
                pass
    finally:
        await engine.dispose()
    assert isinstance(translate(raised.value), DatabaseUnavailable)


# -- a task-splitting middleware inside TenancyMiddleware -----------------------------------


async def test_streams_behind_a_base_http_middleware_share_no_session_across_tasks(
    rls_database: PgDatabase, rls_strategy: RowLevelSecurity
) -> None:
    """``@app.middleware("http")`` (Starlette's ``BaseHTTPMiddleware``) inside TenancyMiddleware
    runs the endpoint and its stream's body in a task of its own and sends the status from
    another: the hold before the status must not use the session from that other task while
    the body queries it."""
    database = TenantDatabase(
        rls_database.app_url,
        rls_strategy,
        engine_options={"pool_size": 1, "max_overflow": 0, "pool_timeout": 0.5},
    )
    app = FastAPI()

    @app.get("/stream")
    async def stream(session: Session) -> StreamingResponse:
        async def rows() -> AsyncIterator[str]:
            for project in await session.scalars(select(Project).order_by(Project.id)):
                yield f"{project.id}:{project.tenant_id}\n"

        return StreamingResponse(rows(), media_type="text/plain")

    @app.middleware("http")
    async def passthrough(request: Any, call_next: Any) -> Any:
        return await call_next(request)

    tenants = InMemoryTenantStore([Tenant(id="acme"), Tenant(id="globex")])
    app.add_middleware(TenancyMiddleware, resolvers=[HeaderResolver()], store=tenants)
    setup_tenancy(app, database=database)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            for tenant in ["acme", "globex"] * 10:
                await database.engine.dispose()  # each checkout connects: it takes a while
                response = await client.get("/stream", headers={"x-tenant-id": tenant})
                assert response.status_code == 200, response.text
                lines = response.text.splitlines()
                assert len(lines) == ROWS_PER_TENANT
                assert {line.split(":")[1] for line in lines} == {tenant}
