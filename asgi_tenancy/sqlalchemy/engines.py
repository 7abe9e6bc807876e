"""A bounded cache of per-tenant engines: single-flight creation, leases, LRU eviction.

- At most ``max_engines`` engines exist (those being created or disposed count too), each with
  a pool of ``pool_size`` connections and no overflow: at most ``max_engines * pool_size``
  connections in all.
- Concurrent first requests for one key create one engine; the others wait for it. A creation
  that fails is not cached: the next request tries again.
- A lease pins an engine; only engines nobody leases are evicted (least recently used first)
  and disposed. When every engine is leased, a new key waits up to ``acquire_timeout`` for one
  to free up, then gets ``TenantCapacityExceeded`` (503).
- ``close()`` refuses new leases, disposes idle engines, and returns once every lease is back.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from ..errors import TenancyUnavailable, TenantCapacityExceeded

__all__ = ["EngineCache"]

logger = logging.getLogger("asgi_tenancy")

Factory = Callable[[str, URL], Awaitable[AsyncEngine]]


@dataclass(eq=False)
class _Entry:
    key: tuple[str, str]
    ready: asyncio.Future[AsyncEngine]
    leases: int = 0
    engine: AsyncEngine | None = field(default=None)


class EngineCache:
    """Engines by (tenant id, URL), made by ``factory(tenant_id, url)``; see the module doc."""

    def __init__(self, factory: Factory, *, max_engines: int, acquire_timeout: float) -> None:
        if max_engines < 1 or acquire_timeout < 0:
            raise ValueError("max_engines must be positive and acquire_timeout not negative")
        self._factory = factory
        self.max_engines = max_engines
        self.acquire_timeout = acquire_timeout
        self._entries: OrderedDict[tuple[str, str], _Entry] = OrderedDict()
        self._disposing = 0
        self._closed = False
        self._changed: asyncio.Event | None = None
        self.created = 0  # engines made over the cache's life (observability, tests)

    def __repr__(self) -> str:
        return (
            f"EngineCache(engines={len(self._entries)}, max_engines={self.max_engines}, "
            f"leased={sum(1 for e in self._entries.values() if e.leases)})"
        )

    def __len__(self) -> int:
        return len(self._entries) + self._disposing

    @property
    def leased(self) -> int:
        return sum(1 for e in self._entries.values() if e.leases)

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    async def _wait_for_change(self, deadline: float) -> bool:
        loop = asyncio.get_running_loop()
        remaining = deadline - loop.time()
        if remaining <= 0:
            return False
        if self._changed is None:
            self._changed = asyncio.Event()
        try:
            await asyncio.wait_for(self._changed.wait(), remaining)
        except TimeoutError:
            return False
        return True

    @asynccontextmanager
    async def lease(self, tenant_id: str, url: URL) -> AsyncIterator[AsyncEngine]:
        """The engine for ``(tenant_id, url)``, pinned until the block exits."""
        entry = await self._acquire((tenant_id, url.render_as_string(hide_password=False)), url)
        try:
            yield await asyncio.shield(entry.ready)
        finally:
            entry.leases -= 1
            if entry.leases == 0:
                if self._closed and self._entries.get(entry.key) is entry:
                    await asyncio.shield(self._evict(entry))
                self._notify()

    async def _acquire(self, key: tuple[str, str], url: URL) -> _Entry:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.acquire_timeout
        tried: set[int] = set()  # victims whose disposal failed during this call
        while True:
            if self._closed:
                raise TenancyUnavailable("the database layer is shutting down")
            entry = self._entries.get(key)
            if entry is not None:
                entry.leases += 1
                self._entries.move_to_end(key)
                try:
                    await asyncio.shield(entry.ready)  # single flight: wait for its creation
                except BaseException:
                    entry.leases -= 1
                    self._notify()
                    raise
                return entry
            if len(self) < self.max_engines:
                self._start(key, url)
                continue
            victim = next(
                (
                    e
                    for e in self._entries.values()
                    if e.leases == 0
                    and id(e) not in tried
                    and e.ready.done()
                    and not e.ready.exception()
                ),
                None,
            )
            if victim is not None:
                tried.add(id(victim))
                await self._evict(victim)
                continue
            if not await self._wait_for_change(deadline):
                raise TenantCapacityExceeded(
                    "every tenant engine is in use", hint="raise max_engines or max_connections"
                )

    def _start(self, key: tuple[str, str], url: URL) -> None:
        entry = _Entry(key, asyncio.ensure_future(self._factory(key[0], url)))
        self._entries[key] = entry

        def done(future: asyncio.Future[AsyncEngine]) -> None:
            if future.cancelled() or future.exception() is not None:
                # Not cached: the next request for this key tries again.
                if self._entries.get(key) is entry:
                    del self._entries[key]
                self._notify()
                return
            entry.engine = future.result()
            self.created += 1

        entry.ready.add_done_callback(done)

    async def _evict(self, entry: _Entry) -> None:
        if self._entries.get(entry.key) is not entry:
            return
        del self._entries[entry.key]
        self._disposing += 1
        try:
            if entry.engine is not None:
                await entry.engine.dispose()
        except Exception:
            # Disposal failed: keep the engine counted (its connections may still be open).
            logger.exception("asgi-tenancy: disposing a tenant engine failed; it stays counted")
            self._entries[entry.key] = entry
            self._entries.move_to_end(entry.key, last=False)
        finally:
            self._disposing -= 1
            self._notify()

    async def close(self) -> None:
        """Refuse new leases, dispose every engine, and return once all leases are back."""
        self._closed = True
        while self._entries:
            idle = [e for e in self._entries.values() if e.leases == 0 and e.ready.done()]
            for entry in idle:
                if entry.engine is None:
                    self._entries.pop(entry.key, None)
                else:
                    await self._evict(entry)
                    if self._entries.get(entry.key) is entry:  # disposal failed: let it go
                        del self._entries[entry.key]
            if idle:
                continue
            if self._changed is None:
                self._changed = asyncio.Event()
            await self._changed.wait()
