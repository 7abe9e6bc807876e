"""Noisy neighbours: one tenant floods a shared pool with slow queries while nine others run
normal traffic, through FastAPI on a real PostgreSQL (row-level security, the app role).

With ``FairShares`` the flooder holds its share and no more: its extra requests get 503
``tenant_over_share`` with ``Retry-After``, the nine get every answer with their own rows only
(checked against an admin read). Without it the same flood takes the whole pool and the nine
get 503s: the test can tell. The slow queries hold until the test cancels their backends
(``pg_cancel_backend``, answered 504), so what overlaps is decided by events, never by timing.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Annotated

import httpx
import pytest
from fastapi import Depends, FastAPI
from sqlalchemy import insert, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from asgi_tenancy import (
    HeaderResolver,
    InMemoryTenantStore,
    TenancyMiddleware,
    Tenant,
    tenant_scope,
)
from asgi_tenancy.fastapi import setup_tenancy, tenant_session
from asgi_tenancy.sqlalchemy import FairShares, RowLevelSecurity, TenantDatabase
from tests.adversarial.models import ROWS_PER_TENANT, Base, Project, seed_rows
from tests.conftest import PgDatabase

NOISY = "noisy"
QUIET = tuple(f"quiet{n}" for n in range(1, 10))
POOL = 4
SHARE = 2
Session = Annotated[AsyncSession, Depends(tenant_session)]


def _strategy() -> RowLevelSecurity:
    return RowLevelSecurity(metadata=Base.metadata, shared_tables={"currencies"})


async def _set_up(url: str) -> None:
    engine = create_async_engine(url)
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
        await _strategy().install(conn)
        for table, rows in seed_rows((NOISY, *QUIET)).items():
            await conn.execute(insert(Base.metadata.tables[table]), rows)
    await engine.dispose()


@pytest.fixture(scope="module")
def database(pg_database: PgDatabase) -> PgDatabase:
    asyncio.run(_set_up(pg_database.admin_url))
    return pg_database


@pytest.fixture
async def expected(admin_engine: AsyncEngine) -> dict[str, list[str]]:
    """Each tenant's project names, read as the admin (owner, RLS forced: filter by hand)."""
    names: dict[str, list[str]] = {}
    async with admin_engine.connect() as conn:
        for tenant_id in QUIET:
            rows = await conn.execute(
                text("SELECT name FROM projects WHERE tenant_id = :t ORDER BY id"),
                {"t": tenant_id},
            )
            names[tenant_id] = list(rows.scalars())
    return names


@dataclass
class Flood:
    """The flooder's slow requests: how many are inside ``pg_sleep``, and their backends."""

    expected: int
    pids: set[int] = field(default_factory=set)
    entered: asyncio.Event = field(default_factory=asyncio.Event)
    stopped: bool = False  # set before the backends are cancelled: no new slow query starts

    async def until_sleeping(self, admin: AsyncEngine) -> None:
        """Until ``expected`` slow requests are inside ``pg_sleep`` on the server."""
        await self.entered.wait()
        async with admin.connect() as conn, asyncio.timeout(30):
            query = text(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE pid = ANY(:p) AND wait_event = 'PgSleep'"
            )
            while await conn.scalar(query, {"p": list(self.pids)}) < self.expected:
                await conn.rollback()  # a fresh snapshot of pg_stat_activity

    async def end(self, admin: AsyncEngine) -> None:
        self.stopped = True
        async with admin.connect() as conn:
            for pid in self.pids:
                await conn.execute(text("SELECT pg_cancel_backend(:p)"), {"p": pid})


def _app(db: TenantDatabase, flood: Flood, tenants: list[Tenant] | None = None) -> FastAPI:
    app = FastAPI()
    store = InMemoryTenantStore(tenants or [Tenant(t) for t in (NOISY, *QUIET)])
    app.add_middleware(TenancyMiddleware, resolvers=[HeaderResolver()], store=store)
    setup_tenancy(app, database=db)

    @app.get("/projects")
    async def projects(session: Session) -> list[str]:
        return list(await session.scalars(select(Project.name).order_by(Project.id)))

    @app.get("/slow")
    async def slow(session: Session) -> int:
        pid = int(await session.scalar(text("SELECT pg_backend_pid()")) or 0)
        if flood.stopped:
            return 0
        flood.pids.add(pid)
        if len(flood.pids) >= flood.expected:
            flood.entered.set()
        await session.execute(text("SELECT pg_sleep(60)"))  # until the test cancels it
        return 0  # pragma: no cover

    return app


async def _run(
    database: PgDatabase,
    admin: AsyncEngine,
    shares: FairShares | None,
    *,
    holders: int,
    rounds: int,
    refusals: int = 0,
    pool_timeout: float,
) -> tuple[list[httpx.Response], dict[str, list[httpx.Response]], list[int]]:
    """Flood until the nine are done; return the flood's answers, the nine's, and the
    flooder's share held while the nine ran (sampled after each of their requests)."""
    db = TenantDatabase(
        database.app_url,
        _strategy(),
        engine_options={"pool_size": POOL, "max_overflow": 0, "pool_timeout": pool_timeout},
        shares=shares,
    )
    flood = Flood(SHARE if shares is not None else holders)
    app = _app(db, flood)
    quiet: dict[str, list[httpx.Response]] = {t: [] for t in QUIET}
    held: list[int] = []
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            noisy = {"x-tenant-id": NOISY}
            slow = [asyncio.create_task(client.get("/slow", headers=noisy)) for _ in range(holders)]
            # The flooder holds what it can get: its share, or the whole pool.
            await flood.until_sleeping(admin)
            stop = asyncio.Event()
            answers: list[httpx.Response] = []
            # The nine run at least ``rounds`` requests each, and on until the flooder has been
            # refused ``refusals`` times: the two overlap by construction, whatever the speed.
            refused = asyncio.Event()
            if shares is None:
                refused.set()

            async def answer(request: asyncio.Future[httpx.Response]) -> None:
                response = await request
                answers.append(response)
                if sum(r.status_code == 503 for r in answers) >= refusals:
                    refused.set()

            waiting = [asyncio.create_task(answer(request)) for request in slow]

            async def keep_flooding() -> None:
                while not stop.is_set():
                    await answer(asyncio.ensure_future(client.get("/slow", headers=noisy)))

            flooders = [asyncio.create_task(keep_flooding()) for _ in range(4)]
            if shares is None:
                flooders = []

            async def normal(tenant_id: str) -> None:
                done = 0
                while done < rounds or not refused.is_set():
                    response = await client.get("/projects", headers={"x-tenant-id": tenant_id})
                    quiet[tenant_id].append(response)
                    done += 1
                    if shares is not None:
                        held.append(shares.held(NOISY))

            await asyncio.gather(*(normal(t) for t in QUIET))
            stop.set()
            await flood.end(admin)
            await asyncio.gather(*waiting)
            await asyncio.gather(*flooders)
    await db.dispose()
    return answers, quiet, held


async def test_a_flooding_tenant_gets_its_share_and_the_nine_get_every_answer(
    database: PgDatabase, admin_engine: AsyncEngine, expected: dict[str, list[str]]
) -> None:
    shares = FairShares(connections=SHARE, wait=0.2)
    answers, quiet, held = await _run(
        database, admin_engine, shares, holders=12, rounds=15, refusals=20, pool_timeout=10
    )

    for tenant_id, responses in quiet.items():
        assert len(responses) >= 15
        assert {r.status_code for r in responses} == {200}, responses[0].text
        assert all(r.json() == expected[tenant_id] for r in responses)  # own rows only
        assert len(expected[tenant_id]) == ROWS_PER_TENANT
    assert len(held) == sum(len(responses) for responses in quiet.values())
    assert set(held) == {SHARE}  # the flooder held its share all along, never more

    codes = [(r.status_code, r.json()["code"] if r.is_error else None) for r in answers]
    over = [r for r in answers if r.status_code == 503]
    assert len(over) >= 20, codes
    assert {code for status, code in codes if status == 503} == {"tenant_over_share"}
    for response in over:
        assert response.headers["content-type"] == "application/problem+json"
        assert response.headers["retry-after"] == "1"
    # The held ones end as the timeouts they are (cancelled: 57014); one let in after the
    # flood stopped answers at once; nothing is a 500.
    assert {status for status, _ in codes} <= {200, 503, 504}
    assert sum(status == 504 for status, _ in codes) >= SHARE
    assert shares.held(NOISY) == 0
    assert all(shares.held(t) == 0 for t in QUIET)


async def test_without_shares_the_same_flood_takes_the_pool_from_the_nine(
    database: PgDatabase, admin_engine: AsyncEngine
) -> None:
    answers, quiet, _ = await _run(
        database, admin_engine, None, holders=POOL, rounds=2, pool_timeout=0.3
    )
    statuses = [r.status_code for responses in quiet.values() for r in responses]
    assert statuses.count(503) == len(statuses)  # every one: the flooder holds the pool
    assert {r.json()["code"] for rs in quiet.values() for r in rs} == {"tenant_capacity_exceeded"}
    # The flooder's own requests end as timeouts, or (one let in after the flood stopped) as
    # a 200 of its own rows; never a 500.
    codes = {(r.status_code, r.json()["code"] if r.is_error else None) for r in answers}
    assert (504, "database_timeout") in codes
    assert {status for status, _ in codes} <= {200, 503, 504}


async def test_a_tenant_statement_timeout_ends_its_slow_query_as_a_504(
    database: PgDatabase,
) -> None:
    db = TenantDatabase(
        database.app_url,
        _strategy(),
        engine_options={"pool_size": 2, "max_overflow": 0},
        shares=FairShares(connections=1, statement_timeout=60_000),
    )
    tenants = [Tenant(NOISY, attributes={"statement_timeout_ms": 100}), *map(Tenant, QUIET)]
    app = _app(db, Flood(1), tenants)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            response = await client.get("/slow", headers={"x-tenant-id": NOISY})
            assert response.status_code == 504
            assert response.json()["code"] == "database_timeout"
            ok = await client.get("/projects", headers={"x-tenant-id": NOISY})
            assert ok.status_code == 200  # the share came back with the connection
    await db.dispose()


async def test_a_cancellation_at_every_turn_gives_the_share_and_connection_back(
    database: PgDatabase,
) -> None:
    shares = FairShares(connections=1, wait=5)
    db = TenantDatabase(
        database.app_url,
        _strategy(),
        engine_options={"pool_size": 2, "max_overflow": 0},
        shares=shares,
    )
    await db.validate()
    tenant = Tenant(NOISY)
    pool = db.engine.sync_engine.pool

    async def use() -> int:
        async with tenant_scope(tenant), db.session() as s:
            return len((await s.scalars(select(Project.id))).all())

    try:
        for turns in range(40):
            # One holds the share, one waits for it; both cancelled after ``turns`` turns.
            tasks = [asyncio.create_task(use()), asyncio.create_task(use())]
            for _ in range(turns):
                await asyncio.sleep(0)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            assert await use() == ROWS_PER_TENANT  # the share came back: no wait, no 503
            assert shares.held(NOISY) == 0
        assert pool.checkedout() <= 1  # type: ignore[attr-defined]  # a shielded release may still run
    finally:
        await db.dispose()
