"""The pytest fixtures of the kit, and the session's databases behind them.

Loaded with ``pytest_plugins = ["asgi_tenancy.testing"]`` in the application's top-level
``conftest.py``: opt-in, so installing asgi-tenancy never slows or changes another suite.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import pytest

from ..tenant import Tenant
from .harness import TwoTenants
from .kit import TenancyKit
from .loop import AdminLoop
from .server import KitServer, local_server

__all__ = [
    "KitDatabases",
    "tenancy",
    "tenancy_database_url",
    "tenancy_databases",
    "tenancy_kit",
    "tenant_a",
    "tenant_b",
]

DATABASE_URL_VARIABLE = "TENANCY_TEST_DATABASE_URL"


class KitDatabases:
    """The test session's databases: per kit, one template and two clones of it (three each
    with a database per tenant), and the admin loop their superuser connections live on.

    The two clones take turns: a test runs on one while the other's rows are put back, so a
    test waits for a reset only when the reset is slower than the test before it.
    """

    def __init__(self, server: KitServer) -> None:
        self.server = server
        self._prepared: dict[int, TwoTenants] = {}
        self._spares: dict[int, TwoTenants] = {}
        self._turns: dict[int, int] = {}
        self._kits: list[TenancyKit] = []  # held, so an id() is never reused
        self._loop: AdminLoop | None = None

    def prepare(self, kit: TenancyKit) -> TwoTenants:
        """The kit's first database for this session, cloned from its template on first use,
        with its rows as seeded (a reset under way is waited for)."""
        found = self._first(kit)
        found.settle()  # the reset after the previous test is done
        return found

    def _first(self, kit: TenancyKit) -> TwoTenants:
        found = self._prepared.get(id(kit))
        if found is None:
            found = asyncio.run(self._prepare(kit))
            self._prepared[id(kit)] = found
            self._kits.append(kit)
        return found

    def _next(self, kit: TenancyKit) -> TwoTenants:
        """The clone whose turn it is; the second is made on the kit's second test."""
        first = self._first(kit)
        turn = self._turns.get(id(kit), 0)
        self._turns[id(kit)] = turn ^ 1
        if turn == 0:
            return first
        spare = self._spares.get(id(kit))
        if spare is None:
            spare = self._spares[id(kit)] = asyncio.run(self._prepare(kit))
            spare.share_checks(first)  # the same template: the same catalog
        return spare

    async def _prepare(self, kit: TenancyKit) -> TwoTenants:
        await self.server.ensure_role(kit.app_role)
        template = await self.server.template(kit)
        database = await self.server.clone(template, kit.app_role)
        if self._loop is None:
            self._loop = AdminLoop()
        if not kit.layout.per_tenant_database:
            return TwoTenants(kit, self.server, database, admin_loop=self._loop)
        a, b = [await self.server.clone(template, kit.app_role) for _ in kit.tenants]
        harness = TwoTenants(kit, self.server, database, (a, b), admin_loop=self._loop)
        await harness.reset()  # the template holds no rows: each clone gets its tenant's
        return harness

    @contextmanager
    def use(self, kit: TenancyKit) -> Iterator[TwoTenants]:
        """A database of the kit for one test; its rows are put back afterwards, on every
        path (in the background: the next test on that clone waits for it)."""
        harness = self._next(kit)
        harness.settle()
        try:
            yield harness
        finally:
            harness.reset_soon()

    def close(self) -> None:
        """Drop this session's clones (templates stay, for the next session)."""
        failure: BaseException | None = None
        harnesses = [*self._prepared.values(), *self._spares.values()]
        for harness in harnesses:
            try:
                harness.settle()
            except RuntimeError as exc:  # reported once everything is dropped
                failure = exc
        if self._loop is not None:
            self._loop.close()  # its connections first: a database in use cannot be dropped
            self._loop = None
        for harness in harnesses:
            for database in harness.databases:
                asyncio.run(self.server.drop(database))
        self._prepared.clear()
        self._spares.clear()
        if failure is not None:
            raise failure


@pytest.fixture(scope="session")
def tenancy_database_url() -> Iterator[str]:
    """A PostgreSQL superuser URL: ``TENANCY_TEST_DATABASE_URL``, or a ``pgserver`` of the
    session's own. Override this fixture to share the suite's own server."""
    url = os.environ.get(DATABASE_URL_VARIABLE)
    if url:
        yield url
        return
    with local_server() as started:
        yield started.render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def tenancy_databases(tenancy_database_url: str) -> Iterator[KitDatabases]:
    """Every kit's database for the session, dropped at its end."""
    databases = KitDatabases(KitServer(tenancy_database_url))
    with ExitStack() as stack:
        stack.callback(databases.close)
        yield databases


@pytest.fixture(scope="session")
def tenancy_kit() -> TenancyKit:
    """The application's kit: define this fixture in your conftest.py."""
    raise pytest.UsageError(
        "define a session-scoped tenancy_kit fixture returning TenancyKit(models=..., "
        "strategy=...) (see docs/testing.md)"
    )


@pytest.fixture
def tenancy(tenancy_databases: KitDatabases, tenancy_kit: TenancyKit) -> Iterator[TwoTenants]:
    """Two tenants with colliding keys on the application's schema and strategy."""
    with tenancy_databases.use(tenancy_kit) as harness:
        yield harness


@pytest.fixture
def tenant_a(tenancy: TwoTenants) -> Tenant:
    """The kit's first tenant, as the application's store would hold it."""
    return tenancy.a


@pytest.fixture
def tenant_b(tenancy: TwoTenants) -> Tenant:
    """The kit's second tenant: its keys are the first one's."""
    return tenancy.b
