"""Fair shares of one shared pool: no tenant holds more than its share of connections at once.

Row-level security, query scoping and schema per tenant serve every tenant from one engine, so
one tenant's slow queries could hold the whole pool. ``FairShares`` gives each tenant a count of
sessions (each holds at most one pooled connection) it may have open at once. A session over
the count waits, first come first served, at most ``wait`` seconds for one of its tenant's own
to end, then gets ``TenantOverShare`` (503, ``Retry-After``); other tenants never wait for it.
A share is taken before the session checks out its connection and given back after the
connection went back to the pool, on every path (errors and cancellation included).

Each tenant may also get a ``statement_timeout``, sent inside the BEGIN message with the
tenant's binding (no round trip of its own), so a slow query ends as a 504 and frees its share.

Per tenant, ``tenant.attributes[connections_attribute]`` and ``[timeout_attribute]`` override
the defaults; a value that is not a whole number within bounds is logged and the default used.
What is kept per tenant (a few counters and its binding) lives in a bounded cache: at most
``max_tenants`` entries, idle ones (nothing held, nobody waiting) dropped least recently used
first, and any idle for ``idle_ttl`` seconds dropped when a new tenant comes. Without
``FairShares`` nothing of this runs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager, suppress
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from ..errors import IsolationConfigError, TenantOverShare
from ..tenant import Tenant
from .strategy import Binding

__all__ = ["FairShares"]

_log = logging.getLogger("asgi_tenancy.sqlalchemy")

_MAX_TIMEOUT_MS = 3_600_000  # an hour: a tenant attribute cannot ask for more
EngineFor = Callable[[AsyncEngine, Tenant], AbstractAsyncContextManager[AsyncEngine]]
BindingFor = Callable[[Tenant], Binding | None]


class _TimedBinding(Binding):
    """The strategy's binding followed, in the same message, by the tenant's statement timeout."""

    __slots__ = ("_inner", "_static", "_timeout")

    def __init__(self, inner: Binding | None, timeout_sql: str) -> None:
        super().__init__(
            timeout_sql if inner is None else f"{inner.sql};{timeout_sql}",
            alone=None if inner is None else inner.alone,
        )
        self._inner = inner
        self._timeout = timeout_sql
        # A binding whose SQL is the same for every transaction is joined once, here.
        self._static = inner is None or type(inner).for_transaction is Binding.for_transaction

    def for_transaction(self, session_key: str | None, counter: int) -> str:
        if self._static:
            return self.sql
        assert self._inner is not None
        return f"{self._inner.for_transaction(session_key, counter)};{self._timeout}"


class _Share:
    """One tenant's count of held sessions, its waiters (FIFO) and its settings."""

    __slots__ = (
        "bound",
        "bound_from",
        "held",
        "idle_since",
        "limit",
        "limit_raw",
        "timeout",
        "timeout_raw",
        "waiters",
    )

    def __init__(self) -> None:
        self.held = 0
        self.waiters: deque[asyncio.Future[bool]] = deque()
        self.idle_since = time.monotonic()
        self.limit = 0
        self.limit_raw: object = _UNSET
        self.timeout: int | None = None
        self.timeout_raw: object = _UNSET
        self.bound_from: Binding | None = None  # the strategy's binding ``bound`` wraps
        self.bound: Binding | None = None


_UNSET = object()


def _same(raw: object, seen: object) -> bool:
    """The attribute as last seen (an equal value from a fresh record counts as the same)."""
    return raw is seen or (type(raw) is type(seen) and raw == seen)


def _whole(value: object, low: int, high: int) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and low <= value <= high:
        return value
    return None


class FairShares:
    """Per-tenant caps on one shared pool: ``TenantDatabase(..., shares=FairShares(...))``.

    ``connections``: sessions one tenant may hold at once (at most the pool's size plus its
    overflow); ``wait``: seconds a session over it waits before ``TenantOverShare``;
    ``statement_timeout``: milliseconds, or ``None`` for the server's own. See the module doc.
    """

    def __init__(
        self,
        *,
        connections: int = 2,
        wait: float = 0.5,
        statement_timeout: int | None = None,
        connections_attribute: str | None = "max_connections",
        timeout_attribute: str | None = "statement_timeout_ms",
        max_tenants: int = 10_000,
        idle_ttl: float = 300.0,
    ) -> None:
        if _whole(connections, 1, 1_000_000) is None:
            raise IsolationConfigError("connections must be a positive whole number")
        if not 0 <= wait <= 60:
            raise IsolationConfigError("wait must be between 0 and 60 seconds")
        if statement_timeout is not None and _whole(statement_timeout, 1, _MAX_TIMEOUT_MS) is None:
            raise IsolationConfigError(
                "statement_timeout must be whole milliseconds, at most an hour",
                hint="None leaves the server's own statement_timeout",
            )
        if max_tenants < 1 or idle_ttl <= 0:
            raise IsolationConfigError("max_tenants and idle_ttl must be positive")
        self.connections = connections
        self.wait = wait
        self.statement_timeout = statement_timeout
        self.connections_attribute = connections_attribute
        self.timeout_attribute = timeout_attribute
        self.max_tenants = max_tenants
        self.idle_ttl = idle_ttl
        self._ceiling = 1_000_000  # the pool's capacity once attached
        self._timeouts = statement_timeout is not None or timeout_attribute is not None
        self._shares: OrderedDict[str, _Share] = OrderedDict()

    def __repr__(self) -> str:
        return (
            f"FairShares(connections={self.connections}, wait={self.wait}, "
            f"statement_timeout={self.statement_timeout}, tenants={len(self._shares)})"
        )

    # -- start-up --------------------------------------------------------------------------

    def attach(self, engine: AsyncEngine) -> None:
        """Check the settings against ``engine`` once (``TenantDatabase.__init__`` calls it)."""
        pool: Any = engine.sync_engine.pool
        size = getattr(pool, "size", None)
        overflow = getattr(pool, "_max_overflow", 0)
        if callable(size) and overflow >= 0:  # a negative overflow is unbounded
            capacity = size() + overflow
            if self.connections > capacity:
                raise IsolationConfigError(
                    "a tenant's share is larger than the whole pool",
                    hint=f"connections <= pool_size + max_overflow ({capacity})",
                )
            self._ceiling = capacity
        else:
            self._ceiling = max(self.connections, 1_000_000)  # no fixed size: no ceiling
        if engine.dialect.name != "postgresql":
            if self.statement_timeout is not None:
                raise IsolationConfigError(
                    "statement_timeout needs PostgreSQL", hint="pass statement_timeout=None"
                )
            self._timeouts = False  # tenant attributes cannot ask for it either

    def engine_for(self, engine_for: EngineFor) -> EngineFor:
        """``engine_for`` of a strategy, holding a share of the tenant around it."""

        def shared(engine: AsyncEngine, tenant: Tenant) -> _Held:
            return _Held(self, engine_for(engine, tenant), tenant)

        return shared

    def binding_for(self, binding_for: BindingFor) -> BindingFor:
        """``binding`` of a strategy, with the tenant's statement timeout in the same message."""
        if not self._timeouts:
            return binding_for

        def timed(tenant: Tenant) -> Binding | None:
            inner = binding_for(tenant)
            share = self._share(tenant)
            if share.timeout is None:
                return inner
            if share.bound is None or share.bound_from is not inner:
                timeout_sql = f"SET LOCAL statement_timeout = {int(share.timeout)}"
                share.bound, share.bound_from = _TimedBinding(inner, timeout_sql), inner
            return share.bound

        return timed

    # -- shares ----------------------------------------------------------------------------

    def held(self, tenant_id: str) -> int:
        """Sessions ``tenant_id`` holds now (for tests and metrics)."""
        share = self._shares.get(tenant_id)
        return 0 if share is None else share.held

    @property
    def tenants(self) -> int:
        """Per-tenant entries held now (bounded by ``max_tenants`` plus those in use)."""
        return len(self._shares)

    async def acquire(self, tenant: Tenant | str) -> _Share:
        """Take one of the tenant's share, waiting at most ``wait``; ``TenantOverShare`` then.
        A bare id gets the defaults (``EngineCache`` counts leases by id)."""
        share = self._share(tenant) if isinstance(tenant, Tenant) else self._share_of(tenant)
        if share.held < share.limit and not share.waiters:
            share.held += 1
            return share
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bool] = loop.create_future()
        share.waiters.append(waiter)
        timer = loop.call_later(self.wait, _expire, share, waiter)
        try:
            granted = await waiter
        except BaseException:
            # Cancelled: a share handed over just before is passed on, else the place is left.
            if waiter.done() and not waiter.cancelled() and waiter.result():
                self.release(share)
            else:
                _leave(share, waiter)
            raise
        finally:
            timer.cancel()
        if not granted:
            raise TenantOverShare(
                "this tenant holds all the connections of its share",
                hint="raise its share (FairShares connections, or the tenant attribute)",
            )
        return share

    def release(self, share: _Share) -> None:
        """Give one back: to the tenant's first waiter, else to the count."""
        while share.waiters:
            waiter = share.waiters.popleft()
            if not waiter.done():
                if share.held <= share.limit:
                    waiter.set_result(True)  # handed over: ``held`` stays as it is
                    return
                share.waiters.appendleft(waiter)  # the share shrank: free one first
                break
        share.held -= 1
        if share.held == 0 and not share.waiters:
            share.idle_since = time.monotonic()

    def _share_of(self, tenant_id: str) -> _Share:
        share = self._shares.get(tenant_id)
        if share is None:
            self._sweep()
            share = self._shares[tenant_id] = _Share()
            share.limit = self.connections
        else:
            self._shares.move_to_end(tenant_id)
        return share

    def _share(self, tenant: Tenant) -> _Share:
        share = self._share_of(tenant.id)
        attributes = tenant.attributes
        if self.connections_attribute is not None:
            raw = attributes.get(self.connections_attribute)
            if not _same(raw, share.limit_raw):
                share.limit_raw = raw
                share.limit = self._setting(raw, self.connections, self._ceiling, "connections")
        if self._timeouts:
            raw = attributes.get(self.timeout_attribute) if self.timeout_attribute else None
            if not _same(raw, share.timeout_raw):
                share.timeout_raw = raw
                share.bound = None  # made again with the new timeout
                share.timeout = self._setting(
                    raw, self.statement_timeout, _MAX_TIMEOUT_MS, "statement timeout"
                )
        return share

    def _setting(self, raw: object, default: Any, high: int, what: str) -> Any:
        if raw is None:
            return default
        value = _whole(raw, 1, high)
        if value is None:
            _log.warning("a tenant's %s attribute is not a whole number in 1-%s", what, high)
            return default
        return value

    def _sweep(self) -> None:
        """Before a new entry: drop idle ones past ``idle_ttl``, and the least recently used
        idle ones while the cache is full. Entries in use stay: each is a session in flight."""
        now = time.monotonic()
        over = len(self._shares) + 1 - self.max_tenants
        dropped = []
        for tenant_id, share in self._shares.items():
            if share.held or share.waiters:
                continue
            if over > 0 or now - share.idle_since > self.idle_ttl:
                dropped.append(tenant_id)
                over -= 1
            else:
                break  # least recently used first: the rest are fresher
        for tenant_id in dropped:
            del self._shares[tenant_id]


class _Held:
    """A share held around the strategy's ``engine_for`` (a class: cheaper than a generator)."""

    __slots__ = ("_inner", "_share", "_shares", "_tenant")

    def __init__(
        self, shares: FairShares, inner: AbstractAsyncContextManager[AsyncEngine], tenant: Tenant
    ) -> None:
        self._shares = shares
        self._inner = inner
        self._tenant = tenant
        self._share: _Share | None = None

    async def __aenter__(self) -> AsyncEngine:
        share = await self._shares.acquire(self._tenant)
        try:
            engine = await self._inner.__aenter__()
        except BaseException:
            self._shares.release(share)
            raise
        self._share = share
        return engine

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        try:
            return await self._inner.__aexit__(*exc_info)
        finally:
            if self._share is not None:
                share, self._share = self._share, None
                self._shares.release(share)


def _expire(share: _Share, waiter: asyncio.Future[bool]) -> None:
    if not waiter.done():
        waiter.set_result(False)
        _leave(share, waiter)


def _leave(share: _Share, waiter: asyncio.Future[bool]) -> None:
    with suppress(ValueError):
        share.waiters.remove(waiter)
