"""``TwoTenants``: one kit's test database, its two tenants, the app role and the admin.

What a test of the application holds: ``a`` and ``b`` (tenants whose keys collide), the
application's ``TenantDatabase`` connected as the app role (``database()``), an admin
connection to read back what really happened (``admin()``, ``rows()``), and ``reset()``, which
puts the seeded rows back after each test (in one SQL message, on the kit's admin loop).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from functools import partial
from typing import Any

from sqlalchemy import Table, delete, insert, select
from sqlalchemy.dialects import postgresql
from sqlalchemy.exc import CompileError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

from ..checks import Finding
from ..sqlalchemy import IsolationStrategy, TenantDatabase
from ..sqlalchemy.hooks import hygiene_of
from ..tenant import Tenant
from .kit import DatabaseLayout, TenancyKit
from .loop import AdminLoop
from .rows import Row
from .server import KitServer, seed

__all__ = ["TwoTenants"]


class TwoTenants:
    """Two tenants on a database of the kit's own, as the app role sees it and as it is.

    ``database`` is the application's own database; with a database per tenant,
    ``tenant_databases`` are the tenants' (and ``a``, ``b`` carry their URLs).
    """

    def __init__(
        self,
        kit: TenancyKit,
        server: KitServer,
        database: str,
        tenant_databases: tuple[str, str] | None = None,
        admin_loop: AdminLoop | None = None,
    ) -> None:
        self.kit = kit
        self.name = database
        self.admin_url = server.url(database)
        self.app_url = server.url(database, kit.app_role)
        self.app_role = kit.app_role
        self._server = server
        self._databases = tenant_databases or (database, database)
        self._loop = admin_loop
        # Per strategy class, once its first database passed validate(): the session-safe
        # functions its statement judge read from this database (empty off PostgreSQL).
        self._allowed: dict[type[IsolationStrategy], frozenset[str]] = {}
        self._kept: dict[asyncio.AbstractEventLoop, tuple[TenantDatabase, Any]] = {}
        self._scripts: dict[int | None, str | None] = {}  # the reset as one SQL text
        self._pending: concurrent.futures.Future[None] | None = None  # a reset under way
        a, b = kit.tenants
        layout = kit.layout
        if tenant_databases is not None and isinstance(layout, DatabaseLayout):
            a, b = (
                layout.placed(t, server.url(name, kit.app_role))
                for t, name in zip(kit.tenants, tenant_databases, strict=True)
            )
        self.a, self.b = a, b

    def __repr__(self) -> str:
        return f"TwoTenants({self.a.id!r}, {self.b.id!r}, database={self.name!r})"

    def share_checks(self, other: TwoTenants) -> None:
        """Take ``other``'s record of which strategies passed their catalog checks: a clone of
        the same template holds the same catalog."""
        self._allowed = other._allowed

    @property
    def databases(self) -> list[str]:
        """Every database of this harness: the application's, then the tenants' own."""
        return list(dict.fromkeys((self.name, *self._databases)))

    def index(self, tenant: Tenant) -> int:
        """0 for ``a``, 1 for ``b`` (by id: a placed tenant carries more attributes)."""
        return [self.a.id, self.b.id].index(tenant.id)

    @asynccontextmanager
    async def database(self) -> AsyncIterator[TenantDatabase]:
        """The application's ``TenantDatabase`` as the app role, validated.

        One per event loop, kept until that loop finalizes its async generators
        (``asyncio.run`` and pytest-asyncio close their loops that way; a loop closed without
        it leaves the connections to the session's end): tests sharing a loop share its warm
        connections. The strategy's catalog checks run in full on the session's first
        database; later ones skip them (the kit puts rows back, never the schema), the rest
        of ``validate()`` runs every time. A test that changes the schema needs its own kit.
        """
        loop = asyncio.get_running_loop()
        kept = self._kept.get(loop)
        if kept is None:
            keeper = self._keep(loop)
            kept = self._kept[loop] = (await keeper.__anext__(), keeper)
        yield kept[0]

    async def _keep(self, loop: asyncio.AbstractEventLoop) -> AsyncGenerator[TenantDatabase]:
        """Holds a database open until the loop finalizes its async generators."""
        strategy = self.kit.strategy()
        kind = type(strategy)
        database = self.kit.database(self.app_url, strategy)
        allowed = self._allowed.get(kind)
        if allowed is not None:
            vars(strategy)["check"] = _checked_earlier
            # The same clone, the same functions: a cold backend reads the list in ~10 ms.
            vars(database)["_load_hygiene"] = partial(_known_hygiene, database, allowed)
        try:
            await database.validate()
            judge = hygiene_of(database.engine)
            self._allowed[kind] = frozenset() if judge is None else judge.functions
            yield database
        finally:
            self._kept.pop(loop, None)
            await database.dispose()

    def session(self, database: TenantDatabase) -> AbstractAsyncContextManager[AsyncSession]:
        """A session of the current tenant, opened the way the application opens one."""
        return self.kit.session(database)

    @asynccontextmanager
    async def admin(self, tenant: Tenant | None = None) -> AsyncIterator[AsyncConnection]:
        """A superuser connection in one transaction: it sees every tenant's rows (with a
        database per tenant, those of ``tenant``'s database)."""
        engine = self._server.engine(self._name_of(tenant))
        try:
            async with engine.begin() as conn:
                yield conn
        finally:
            await engine.dispose()

    @asynccontextmanager
    async def _admin(self, tenant: Tenant | None = None) -> AsyncIterator[AsyncConnection]:
        """``admin()`` on the kit's admin loop: its engines stay open across tests."""
        if self._loop is None:
            async with self.admin(tenant) as conn:
                yield conn
            return
        engine = self._loop.engine(self._name_of(tenant), self._engine_for(tenant))
        async with engine.begin() as conn:
            yield conn

    def _name_of(self, tenant: Tenant | None) -> str:
        return self.name if tenant is None else self._databases[self.index(tenant)]

    def _engine_for(self, tenant: Tenant | None) -> Callable[[], AsyncEngine]:
        name = self._name_of(tenant)
        return lambda: self._server.engine(name)

    async def rows(self, table: Table, tenant: Tenant) -> list[Row]:
        """``tenant``'s rows of ``table`` as they are, read by the admin (ordered by key)."""
        if self._loop is None:
            return await self._rows(table, tenant)
        return await self._loop.run_async(self._rows(table, tenant))

    async def _rows(self, table: Table, tenant: Tenant) -> list[Row]:
        async with self._admin(tenant) as conn:
            return await self.read(conn, table, tenant)

    async def read(self, conn: AsyncConnection, table: Table, tenant: Tenant) -> list[Row]:
        statement = select(table).order_by(*table.primary_key.columns)
        where = self.kit.layout.where(table, tenant)
        if where is not None:
            statement = statement.where(where)
        result = await conn.execute(statement, execution_options=self.kit.layout.options(tenant))
        return [dict(r._mapping) for r in result]

    def seeded(self, table: Table, tenant: Tenant) -> list[Row]:
        """The rows every test starts with."""
        return self.kit.rows.rows(table, self.index(tenant))

    async def reset(self) -> None:
        """Every table back to the seeded rows, one transaction per database."""
        pending, self._pending = self._pending, None
        if pending is not None:  # never two resets at once
            await asyncio.wrap_future(pending)
        if self._loop is None:
            await self._reset()
        else:
            await self._loop.run_async(self._reset())

    def reset_now(self) -> None:
        """``reset()`` from synchronous code (a fixture's teardown), outside any event loop."""
        self.settle()
        if self._loop is None:
            asyncio.run(self._reset())
        else:
            self._loop.run(self._reset())

    def reset_soon(self) -> None:
        """Start the reset on the admin loop and return: it overlaps pytest's own work between
        two tests; ``settle()`` (called before the harness is handed out again) waits for it."""
        if self._loop is None:
            self.reset_now()
            return
        self.settle()
        self._pending = self._loop.submit(self._reset())

    def settle(self) -> None:
        """Wait for a reset started by ``reset_soon()``; re-raise its failure, if any."""
        pending, self._pending = self._pending, None
        if pending is not None:
            try:
                pending.result()
            except Exception as exc:
                raise RuntimeError(
                    "the test kit could not put the seeded rows back after the previous test"
                ) from exc

    async def _reset(self) -> None:
        owners: list[Tenant | None] = [None]
        if self.kit.layout.per_tenant_database:
            owners = [self.a, self.b]
        for tenant in owners:
            only = None if tenant is None else self.index(tenant)
            script = self._scripts.get(only, "")
            if script is not None and self._loop is not None:
                engine = self._loop.engine(self._name_of(tenant), self._engine_for(tenant))
                async with engine.connect() as conn:
                    raw = (await conn.get_raw_connection()).driver_connection
                    if script == "":
                        script = self._scripts[only] = await _reset_script(self.kit, only, raw)
                    if script is not None:
                        # One simple-protocol message: one round trip, one transaction.
                        await raw.execute(script)  # type: ignore[union-attr]
                        continue
            async with self._admin(tenant) as conn:
                await self._clear(conn)
                await seed(conn, self.kit, only=only)

    async def _clear(self, conn: AsyncConnection) -> None:
        kit = self.kit
        for table in reversed(kit.metadata.sorted_tables):
            owners = kit.layout.owners(kit, table)
            if kit.layout.tenant_column is not None or kit.layout.per_tenant_database:
                owners = [None]  # one table holds the rows: one DELETE clears them
            for owner in owners:
                tenant = None if owner is None else kit.tenants[owner]
                await conn.execute(delete(table), execution_options=kit.layout.options(tenant))


#: Any trigger or rule of the database's own: with one, the reset fires them as the seeding did.
_USER_TRIGGERS = """
SELECT EXISTS (SELECT 1 FROM pg_trigger WHERE NOT tgisinternal)
    OR EXISTS (
        SELECT 1 FROM pg_rewrite r JOIN pg_class c ON c.oid = r.ev_class
        WHERE c.relkind IN ('r', 'p') AND r.rulename <> '_RETURN'
    )
"""


async def _reset_script(kit: TenancyKit, only: int | None, raw: Any) -> str | None:
    """``_script`` in a transaction; with no trigger or rule of the application's in the
    database, as ``session_replication_role = replica``: the seeded rows are consistent by
    construction, so skipping the foreign-key checks (half of the reset's time) changes
    nothing but the time. ``None``: statement by statement."""
    script = _script(kit, only)
    if script is None:
        return None
    fast = not await raw.fetchval(_USER_TRIGGERS)
    replica = "SET LOCAL session_replication_role = replica;\n" if fast else ""
    return f"BEGIN;\n{replica}{script};\nCOMMIT"


async def _known_hygiene(database: TenantDatabase, functions: frozenset[str]) -> None:
    judge = hygiene_of(database.engine)
    if judge is not None:
        judge.with_functions(functions)  # read from this database earlier in the session


async def _checked_earlier(*args: Any, **kwargs: Any) -> list[Finding]:
    return []  # this database passed the strategy's checks earlier in the session


def _script(kit: TenancyKit, only: int | None) -> str | None:
    """The reset as one SQL text (DELETE every table, INSERT the seeded rows, values inlined),
    sent in one round trip; ``None`` when a value has no SQL literal (then statement by
    statement). Every value is the kit's own (rows.py), never a test's input."""
    dialect = postgresql.dialect()  # type: ignore[no-untyped-call]
    layout = kit.layout
    statements: list[str] = []
    try:
        tables = kit.metadata.sorted_tables
        for table in reversed(tables):
            owners = layout.owners(kit, table)
            if layout.tenant_column is not None or layout.per_tenant_database:
                owners = [None]
            for owner in owners:
                tenant = None if owner is None else kit.tenants[owner]
                statements.append(_literal(delete(table), dialect, layout.options(tenant)))
        for table in tables:
            for owner in layout.owners(kit, table):
                if only is not None and owner != only:
                    continue
                tenant = None if owner is None else kit.tenants[owner]
                rows = kit.rows.rows(table, owner)
                statement = insert(table).values(rows)
                statements.append(_literal(statement, dialect, layout.options(tenant)))
    except (CompileError, NotImplementedError, TypeError, ValueError):
        return None
    return ";\n".join(statements)


def _literal(statement: Any, dialect: Any, options: dict[str, Any]) -> str:
    translate = options.get("schema_translate_map")
    compiled = statement.compile(
        dialect=dialect,
        schema_translate_map=translate,
        render_schema_translate=translate is not None,
        compile_kwargs={"literal_binds": True},
    )
    return str(compiled)
