"""``TenantDatabase``: sessions bound to the current tenant, or an error before any SQL."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.util import greenlet_spawn

from ..context import current_tenant, in_central_scope
from ..errors import (
    DatabaseNotValidated,
    DatabaseUnavailable,
    IsolationConfigError,
    TenancyError,
    TenantContextError,
)
from . import hooks
from .failures import TRANSLATABLE, describe, translate
from .session import TenantBoundSession
from .shares import BindingFor, EngineFor, FairShares
from .strategy import IsolationStrategy

__all__ = ["TenantDatabase"]


_log = logging.getLogger("asgi_tenancy.sqlalchemy")


async def _release(session: AsyncSession, failure: BaseException | None) -> None:
    """Close ``session``, or invalidate it when ``failure`` means its connection is lost; never
    raises an ``Exception`` (what failed is logged once, with its cause)."""
    try:
        if failure is not None and isinstance(translate(failure), DatabaseUnavailable):
            await session.invalidate()  # nothing to roll back on a dead connection
        else:
            await session.close()
    except Exception as exc:
        _log.warning(
            "releasing a tenant session failed; its connection is replaced: %s",
            describe(exc),
            exc_info=exc,
        )
        await _discard(session)


async def _release_cancel_safe(session: AsyncSession, failure: BaseException | None) -> None:
    """``_release``, which a cancellation does not stop: a cancelled request still returns its
    connection. Shielded only where a cancellation is pending (a shield costs a task and an
    event-loop turn per request); one that arrives during the release drops the connection,
    whose state is then unknown, in a shielded task of its own."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        await asyncio.shield(_release(session, failure))
        return
    try:
        await _release(session, failure)
    except asyncio.CancelledError:
        await asyncio.shield(_discard(session))
        raise


async def _discard(session: AsyncSession) -> None:
    """Invalidate ``session``: its connection is dropped, not returned; never raises."""
    try:
        await session.invalidate()
    except Exception:  # already as broken as it gets: the pool forgets it
        _log.debug("invalidating a broken session failed", exc_info=True)


class TenantDatabase:
    """The application's database, served one tenant at a time.

    ``async with db.session() as s`` yields an ``AsyncSession`` bound to ``current_tenant()``;
    outside a tenant scope it raises ``TenantContextError`` before a connection is taken.
    Sessions are refused until ``validate()`` has passed: a misconfigured deployment does not
    serve. Central work goes through ``admin_engine``, only inside ``central_scope``.
    ``safe_functions`` names the application's own functions that leave no session state
    (``hygiene.py``: any other function call makes a connection be replaced after use).
    ``shares`` caps what one tenant holds of the shared pool (``shares.py``).
    """

    def __init__(
        self,
        engine: AsyncEngine | str | URL,
        strategy: IsolationStrategy,
        *,
        admin_engine: AsyncEngine | None = None,
        engine_options: Mapping[str, Any] | None = None,
        session_options: Mapping[str, Any] | None = None,
        safe_functions: Iterable[str] = (),
        shares: FairShares | None = None,
    ) -> None:
        if not isinstance(strategy, IsolationStrategy):
            raise IsolationConfigError(
                "strategy must be an isolation strategy",
                hint="pass RowLevelSecurity(), QueryScoping(), SchemaPerTenant() or "
                "DatabasePerTenant()",
            )
        if isinstance(engine, AsyncEngine):
            if engine_options:
                raise IsolationConfigError(
                    "engine_options apply only when TenantDatabase creates the engine"
                )
            self.engine = engine
        else:
            self.engine = create_async_engine(engine, **dict(engine_options or {}))
        if admin_engine is not None and admin_engine is self.engine:
            raise IsolationConfigError(
                "the admin engine must be separate from the tenant engine",
                hint="connect the admin engine as another role",
            )
        hooks.install(self.engine, strategy.statement_guard, connect_sql=strategy.connect_sql)
        self._safe_functions = frozenset(safe_functions)
        self.strategy = strategy
        self.admin_engine = admin_engine
        self._session_options = {"expire_on_commit": False, **dict(session_options or {})}
        self._validated = False
        strategy.attach(self.engine)
        # Fair shares wrap the strategy's two request-path calls once; without them, nothing.
        self.shares = shares
        self._engine_for: EngineFor = strategy.engine_for
        self._binding: BindingFor = strategy.binding
        if shares is not None:
            shares.attach(self.engine)
            self._engine_for = shares.engine_for(strategy.engine_for)
            self._binding = shares.binding_for(strategy.binding)

    def __repr__(self) -> str:
        return f"TenantDatabase({self.engine.url!r}, strategy={self.strategy.name!r})"

    @property
    def validated(self) -> bool:
        return self._validated

    async def validate(self) -> None:
        """Check the live database for this strategy; sessions stay refused until it passes."""
        self._validated = False
        hooks.check_first(self.engine)
        try:
            await self._load_hygiene()
            await self.strategy.validate(self.engine)
        except TenancyError:
            raise
        except (OSError, TimeoutError, sa_exc.OperationalError, sa_exc.InterfaceError) as exc:
            # The cause (kept for the log) may name the host; the message never does.
            raise DatabaseUnavailable(
                "the database could not be reached to validate isolation"
            ) from exc
        except sa_exc.DBAPIError as exc:
            if isinstance(translate(exc), DatabaseUnavailable):
                raise DatabaseUnavailable(
                    "the database could not be reached to validate isolation"
                ) from exc
            raise IsolationConfigError(
                "validation could not read the catalog",
                hint=f"the database answered {type(exc.orig).__name__}; check the role's grants",
            ) from exc
        self._validated = True

    async def _load_hygiene(self) -> None:
        """The allow-list of session-safe functions, read from the server once."""
        hygiene = hooks.hygiene_of(self.engine)
        if hygiene is None:
            return
        sql, params = hygiene.allowed_sql()
        locks_sql, locks_params = hygiene.session_locks_sql()
        # The library's own statements: not judged (the allow-list is not loaded yet, and
        # its function calls would have this connection replaced).
        own = hooks.own_statement
        async with self.engine.connect() as conn:
            names = (await conn.execute(text(sql), params, execution_options=own)).scalars().all()
            can_lock = bool(await conn.scalar(text(locks_sql), locks_params, execution_options=own))
        # A function the application vouches for is not judged: it may take a lock unseen.
        session_locks = can_lock or bool(self._safe_functions)
        hygiene.with_functions([*names, *self._safe_functions], session_locks=session_locks)

    @asynccontextmanager
    async def session(self) -> AsyncIterator[AsyncSession]:
        """A session of the current tenant; every transaction in it is bound to that tenant.

        Database failures inside the block leave it as ``TenancyError``s (``failures.py``).
        Its release never raises: after a lost connection the session is invalidated (no
        rollback is sent to a dead server), and a failing rollback or close is logged and
        swallowed, since by then the response may be out and the connection is replaced anyway.
        """
        tenant = current_tenant()
        if not self._validated:
            raise DatabaseNotValidated(
                "TenantDatabase has not been validated",
                hint="await database.validate() at start-up (setup_tenancy does it for FastAPI)",
            )
        strategy = self.strategy
        try:
            async with self._engine_for(self.engine, tenant) as engine:
                session = AsyncSession(
                    engine,
                    sync_session_class=TenantBoundSession,
                    tenant=tenant,
                    binding=self._binding(tenant),
                    criteria=strategy.criteria,
                    **self._session_options,
                )
                failure: BaseException | None = None
                try:
                    yield session
                except BaseException as exc:
                    failure = exc
                    raise
                finally:
                    await _release_cancel_safe(session, failure)
        except TRANSLATABLE as exc:  # translating(), inline: one generator less per request
            mapped = translate(exc)
            if mapped is None:
                raise
            raise mapped from exc

    async def hold_connection(self, session: AsyncSession) -> None:
        """Check out ``session``'s connection and send its bound ``BEGIN`` now, as a stream
        needs before its status goes out; nothing when the session holds one already (no
        greenlet hop: each new greenlet maps and unmaps a frame-stack chunk).
        Failures are ``TenancyError``s, as inside ``session()``."""
        sync = session.sync_session
        transaction = sync._transaction
        if transaction is not None and transaction._connections:
            return
        try:
            await greenlet_spawn(sync.connection)
        except TRANSLATABLE as exc:
            mapped = translate(exc)
            if mapped is None:
                raise
            raise mapped from exc

    @asynccontextmanager
    async def admin_session(self) -> AsyncIterator[AsyncSession]:
        """A session on the admin engine, only inside ``central_scope``."""
        if not in_central_scope():
            raise TenantContextError("admin sessions open only inside central_scope()")
        if self.admin_engine is None:
            raise IsolationConfigError(
                "no admin engine configured", hint="TenantDatabase(..., admin_engine=...)"
            )
        session = AsyncSession(self.admin_engine, expire_on_commit=False)
        try:
            yield session
        finally:
            await asyncio.shield(session.close())

    async def dispose(self) -> None:
        """Close every pool this database opened (tenant, strategy-held and admin engines)."""
        self._validated = False
        await self.strategy.dispose()
        await self.engine.dispose()
        if self.admin_engine is not None:
            await self.admin_engine.dispose()
