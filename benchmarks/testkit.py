"""A tenant test of the test kit (``asgi_tenancy.testing``) against the same test without it.

Three contenders run the same body on the example app's models (insert a project and a task,
read the project's tasks back, mark one done, count the projects):

- plain: no tenancy; an engine as the table owner, one transaction rolled back at the end
  (the usual "rollback per test" fixture), on a database created once;
- tenancy: the tenant test without the kit, on a ``TenantDatabase`` validated by hand, nothing
  put back (what the library itself costs a test);
- kit: ``TwoTenants`` from the session's clone of the kit's template, the application's
  ``TenantDatabase`` as the app role (validated), a tenant scope, commit, and the kit's reset
  of the rows afterwards (what the ``tenancy`` fixture does). The reset runs in the
  background and is waited for at the end of the test: counted in full, where a real suite
  hides part of it behind pytest's own work between tests.

Each strategy runs twice, the same loop policy for all: ``function`` (a loop per test,
pytest-asyncio's default: every test connects anew) and ``session`` (one loop for every test:
engines and the kit's ``TenantDatabase`` keep their connections). The contenders take turns
test by test. Prints one JSON object: median milliseconds per test, ``ratio`` kit / plain
(target <= 1.5), ``ratio_to_tenancy_without_kit`` (what the kit itself adds), and two phases
of the kit's tests (database and validation, body).
``python -m benchmarks.testkit [row query schema database]``.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable, Coroutine
from functools import partial
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from asgi_tenancy import tenant_scope
from asgi_tenancy.sqlalchemy import TenantDatabase
from asgi_tenancy.testing import KitDatabases, KitServer, TenancyKit, TwoTenants
from benchmarks.common import machine, median, postgres
from examples.fastapi_app.models import Base, Project, Task
from examples.fastapi_app.provision import strategy_for

ROUNDS, TESTS, WARM_UP = 10, 20, 5


async def body(session: AsyncSession, number: int, tenant_id: str | None) -> None:
    """What a test of the application does: a few writes and reads of its own rows."""
    stamp = {} if tenant_id is None else {"tenant_id": tenant_id}
    project = Project(id=5000 + number, name=f"p{number}", **stamp)
    session.add(project)
    await session.flush()
    session.add(Task(id=5000 + number, project_id=project.id, title="t", **stamp))
    await session.flush()
    tasks = (await session.scalars(select(Task).where(Task.project_id == project.id))).all()
    tasks[0].done = True
    await session.flush()
    await session.scalar(select(func.count()).select_from(Project))


Run = Callable[[Coroutine[Any, Any, None]], None]


def plain_test(url: str, run: Run, engines: list[AsyncEngine]) -> Callable[[int], None]:
    """One engine in ``engines`` for every test (they share a loop), else one per test."""
    shared = run is not asyncio.run

    def test(number: int) -> None:
        async def one() -> None:
            if not engines:
                engines.append(create_async_engine(url, pool_size=2, max_overflow=0))
            engine = engines[0]
            try:
                async with engine.connect() as conn:
                    transaction = await conn.begin()
                    async with AsyncSession(bind=conn) as session:
                        await body(session, number, "acme")
                    await transaction.rollback()
            finally:
                if not shared:
                    await engines.pop().dispose()

        run(one())

    return test


def tenancy_test(
    harness: TwoTenants, kit: TenancyKit, run: Run, kept: list[TenantDatabase]
) -> Callable[[int], None]:
    """The same tenant test without the kit: the application's ``TenantDatabase`` made and
    validated by hand (once per loop, as the kit does), nothing put back afterwards."""
    shared = run is not asyncio.run

    def test(number: int) -> None:
        async def one() -> None:
            if not kept:
                database = kit.database(harness.app_url, kit.strategy())
                await database.validate()
                kept.append(database)
            database = kept[0]
            try:
                async with tenant_scope(harness.a), harness.session(database) as session:
                    await body(session, 100_000 + number, None)
                    await session.commit()
            finally:
                if not shared:
                    await kept.pop().dispose()

        run(one())

    return test


def kit_test(
    databases: KitDatabases, kit: TenancyKit, run: Run, phases: dict[str, list[float]]
) -> Callable[[int], None]:
    def test(number: int) -> None:
        async def one(harness: TwoTenants) -> None:
            start = time.perf_counter()
            async with harness.database() as database:
                ready = time.perf_counter()
                async with tenant_scope(harness.a), harness.session(database) as session:
                    await body(session, number, None)
                    await session.commit()
                phases["body"].append(time.perf_counter() - ready)
            phases["database"].append(ready - start)

        with databases.use(kit) as harness:
            run(one(harness))
        harness.settle()  # the reset, counted in this test (a real suite hides some of it)

    return test


def interleaved(runs: dict[str, Callable[[int], None]]) -> dict[str, list[float]]:
    """Per-test seconds; the contenders take turns test by test (in alternating order), so a
    burst of load on the shared machine hits both alike."""
    for run in runs.values():
        for i in range(WARM_UP):
            run(i)
    times: dict[str, list[float]] = {name: [] for name in runs}
    number = WARM_UP
    for i in range(ROUNDS * TESTS):
        order = list(runs.items()) if i % 2 == 0 else list(reversed(runs.items()))
        for name, run in order:
            number += 1
            start = time.perf_counter()
            run(number)
            times[name].append(time.perf_counter() - start)
    return times


async def _plain_database(server: KitServer, name: str) -> str:
    await server.execute(server.maintenance, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    await server.execute(server.maintenance, f"CREATE DATABASE {name}")
    engine = server.engine(name)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
            await conn.execute(text("SELECT 1"))
    finally:
        await engine.dispose()
    return server.url(name)


def measure(server: KitServer, isolation: str, loop: str) -> dict[str, Any]:
    """``loop``: "function" (a loop per test, pytest-asyncio's default: both sides connect in
    every test) or "session" (one loop for every test: both sides keep their connections)."""
    kit = TenancyKit(
        models=Base, strategy=partial(strategy_for, isolation), name=f"bench_{isolation}"
    )
    databases = KitDatabases(server)
    phases: dict[str, list[float]] = {"database": [], "body": []}
    runner = asyncio.Runner()
    run: Run = asyncio.run if loop == "function" else runner.run
    try:
        start = time.perf_counter()
        databases.prepare(kit)  # the session's one clone (the template is built if missing)
        prepare = time.perf_counter() - start
        plain_url = asyncio.run(_plain_database(server, "bench_plain"))
        engines: list[AsyncEngine] = []
        kept: list[TenantDatabase] = []
        times = interleaved(
            {
                "plain": plain_test(plain_url, run, engines),
                "tenancy": tenancy_test(databases.prepare(kit), kit, run, kept),
                "kit": kit_test(databases, kit, run, phases),
            }
        )
        for engine in engines:
            run(engine.dispose())
        for database in kept:
            run(database.dispose())
    finally:
        runner.close()  # the kit's database for this loop is disposed here
        databases.close()
    plain, tenancy, tenant = (median(times[k]) for k in ("plain", "tenancy", "kit"))
    return {
        "plain_ms": round(plain * 1000, 2),
        "tenancy_without_kit_ms": round(tenancy * 1000, 2),
        "kit_ms": round(tenant * 1000, 2),
        "ratio": round(tenant / plain, 3),
        "ratio_to_tenancy_without_kit": round(tenant / tenancy, 3),
        "kit_phases_ms": {k: round(median(v) * 1000, 2) for k, v in phases.items()},
        "session_prepare_s": round(prepare, 2),
        "tests_per_contender": ROUNDS * TESTS,
    }


def main(names: list[str]) -> dict[str, object]:
    results: dict[str, object] = {"machine": machine(), "target_ratio": 1.5}
    with postgres() as url:
        server = KitServer(url)
        for name in names:
            results[name] = {loop: measure(server, name, loop) for loop in ("function", "session")}
    return results


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:] or ["row", "query", "schema", "database"]), indent=2))
