"""A bounded cache of per-tenant engines: single-flight creation, leases, LRU eviction.

- At most ``max_engines`` engines exist (those being created or disposed count too), each with
  a pool of ``pool_size`` connections and no overflow: at most ``max_engines * pool_size``
  connections in all.
- Concurrent first requests for one key create one engine; the others wait for it. A creation
  that fails is not cached: the next request tries again.
- A lease pins an engine; only engines nobody leases are evicted (least recently used first)
  and disposed. When every engine is leased, a new key waits up to ``acquire_timeout`` for one
  to free up, then gets ``TenantCapacityExceeded`` (503).
- Waiting is first come, first served: while anyone waits for an engine, every new lease
  (of an existing engine too) queues behind, so busy engines drain and the engine freed first
  goes to the one waiting longest; no tenant starves while others keep re-leasing.
- ``per_key`` caps the leases of one tenant at once (its pool: no lease waits on a pool
  inside); one more waits up to ``acquire_timeout`` in its tenant's line, then gets
  ``TenantOverShare`` (503).
- ``close()`` refuses new leases, disposes idle engines, and returns once every lease is back.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING

from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from ...errors import TenancyShuttingDown, TenantCapacityExceeded
from ..shares import FairShares

if TYPE_CHECKING:
    from ..shares import _Share

__all__ = ["EngineCache"]

logger = logging.getLogger("asgi_tenancy")

Factory = Callable[[str, URL], Awaitable[AsyncEngine]]


@dataclass(eq=False)
class _Entry:
    key: tuple[str, str]
    ready: asyncio.Future[AsyncEngine]
    leases: int = 0
    engine: AsyncEngine | None = field(default=None)
    undisposable: bool = False  # its disposal failed: counted, never picked to evict again


@dataclass(eq=False)
class _Waiter:
    """One lease waiting its turn; ``turn`` gets the entry, or ``None`` when its time ran out."""

    key: tuple[str, str]
    url: URL
    turn: asyncio.Future[_Entry | None]


class EngineCache:
    """Engines by (tenant id, URL), made by ``factory(tenant_id, url)``; see the module doc."""

    def __init__(
        self,
        factory: Factory,
        *,
        max_engines: int,
        acquire_timeout: float,
        per_key: int | None = None,
    ) -> None:
        if max_engines < 1 or acquire_timeout < 0 or (per_key is not None and per_key < 1):
            raise ValueError("max_engines must be positive and acquire_timeout not negative")
        self._factory = factory
        self.max_engines = max_engines
        self.acquire_timeout = acquire_timeout
        self._entries: OrderedDict[tuple[str, str], _Entry] = OrderedDict()
        self._disposing = 0
        self._closed = False
        self._changed: asyncio.Event | None = None
        self._queue: deque[_Waiter] = deque()  # leases waiting for an engine, in arrival order
        self._disposals: set[asyncio.Future[None]] = set()  # background disposals (kept alive)
        self._shares = (
            None
            if per_key is None
            else FairShares(
                connections=per_key,
                wait=acquire_timeout,
                connections_attribute=None,
                timeout_attribute=None,
            )
        )
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

    def lease(
        self, tenant_id: str, url: URL, rendered: str | None = None
    ) -> AbstractAsyncContextManager[AsyncEngine]:
        """The engine for ``(tenant_id, url)``, pinned until the block exits (``rendered``: the
        URL as a string with its password, when the caller has it already)."""
        if rendered is None:
            rendered = url.render_as_string(hide_password=False)
        return _Lease(self, tenant_id, (tenant_id, rendered), url)

    def _unlease(self, entry: _Entry) -> None:
        entry.leases -= 1
        if entry.leases == 0:
            if self._closed and self._entries.get(entry.key) is entry:
                self._evict_soon(entry)
            self._notify()
            self._pump()

    def _grant_now(self, key: tuple[str, str], url: URL) -> _Entry | None:
        """A lease granted at once (nobody waits ahead), or ``None``: wait in line."""
        if self._closed:
            raise TenancyShuttingDown("the database layer is shutting down")
        return None if self._queue else self._grant(key, url)

    async def _acquire(self, key: tuple[str, str], url: URL, entry: _Entry | None) -> _Entry:
        """``entry`` (from ``_grant_now``) or one granted in turn, once its engine is made."""
        if entry is None:
            entry = await self._wait_turn(key, url)
        try:
            await asyncio.shield(entry.ready)  # single flight: wait for its creation
        except BaseException:
            self._unlease(entry)
            raise
        return entry

    async def _wait_turn(self, key: tuple[str, str], url: URL) -> _Entry:
        loop = asyncio.get_running_loop()
        waiter = _Waiter(key, url, loop.create_future())
        self._queue.append(waiter)
        timer = loop.call_later(self.acquire_timeout, self._expire, waiter)
        try:
            entry = await waiter.turn
        except BaseException:
            turn = waiter.turn
            granted = turn.result() if turn.done() and not turn.cancelled() else None
            if granted is not None:
                self._unlease(granted)  # leased just before the cancel: give it back
            else:
                self._leave(waiter)
            raise
        finally:
            timer.cancel()
        if entry is None:
            if self._closed:
                raise TenancyShuttingDown("the database layer is shutting down")
            raise TenantCapacityExceeded(
                "every tenant engine is in use", hint="raise max_engines or max_connections"
            )
        return entry

    def _grant(self, key: tuple[str, str], url: URL) -> _Entry | None:
        """A lease now, or ``None`` (then an idle engine may be on its way out for it)."""
        entry = self._entries.get(key)
        if entry is None and len(self) < self.max_engines:
            entry = self._start(key, url)
        if entry is not None:
            entry.leases += 1
            self._entries.move_to_end(key)
            return entry
        victim = next(
            (
                e
                for e in self._entries.values()
                if e.leases == 0
                and not e.undisposable
                and e.ready.done()
                and not e.ready.cancelled()
                and not e.ready.exception()
            ),
            None,
        )
        if victim is not None and not self._disposing:
            self._evict_soon(victim)
        return None

    def _pump(self) -> None:
        """Serve the line from its head while the head can be served."""
        while self._queue:
            head = self._queue[0]
            if head.turn.done():
                self._queue.popleft()
                continue
            if self._closed:
                self._queue.popleft()
                head.turn.set_result(None)
                continue
            entry = self._grant(head.key, head.url)
            if entry is None:
                return
            self._queue.popleft()
            head.turn.set_result(entry)

    def _expire(self, waiter: _Waiter) -> None:
        if not waiter.turn.done():
            waiter.turn.set_result(None)
            self._leave(waiter)

    def _leave(self, waiter: _Waiter) -> None:
        try:
            self._queue.remove(waiter)
        except ValueError:
            return
        self._pump()  # the head may have changed

    def _start(self, key: tuple[str, str], url: URL) -> _Entry:
        entry = _Entry(key, asyncio.ensure_future(self._factory(key[0], url)))
        self._entries[key] = entry

        def done(future: asyncio.Future[AsyncEngine]) -> None:
            if future.cancelled() or future.exception() is not None:
                # Not cached: the next request for this key tries again.
                if self._entries.get(key) is entry:
                    del self._entries[key]
                self._notify()
                self._pump()
                return
            entry.engine = future.result()
            self.created += 1

        entry.ready.add_done_callback(done)
        return entry

    def _evict_soon(self, entry: _Entry) -> None:
        """Dispose ``entry`` in the background; its slot counts until that is done."""
        if self._entries.get(entry.key) is not entry:
            return
        del self._entries[entry.key]
        self._disposing += 1
        task = asyncio.ensure_future(self._dispose(entry))
        self._disposals.add(task)
        task.add_done_callback(self._disposals.discard)

    async def _dispose(self, entry: _Entry) -> None:
        try:
            if entry.engine is not None:
                await entry.engine.dispose()
        except Exception:
            # Disposal failed: keep the engine counted (its connections may still be open).
            logger.exception("asgi-tenancy: disposing a tenant engine failed; it stays counted")
            entry.undisposable = True
            self._entries[entry.key] = entry
            self._entries.move_to_end(entry.key, last=False)
        finally:
            self._disposing -= 1
            self._notify()
            self._pump()

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
        self._pump()  # everyone still waiting is told
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
        if self._disposals:
            await asyncio.gather(*list(self._disposals), return_exceptions=True)


def _made(ready: asyncio.Future[AsyncEngine]) -> bool:
    return ready.done() and not ready.cancelled() and ready.exception() is None


class _Lease(AbstractAsyncContextManager[AsyncEngine]):
    """One lease of ``EngineCache.lease``. An engine that is ready, with nobody waiting and no
    per-tenant cap, is granted without a coroutine or a generator (once per request)."""

    __slots__ = ("_cache", "_entry", "_key", "_share", "_tenant_id", "_url")

    def __init__(self, cache: EngineCache, tenant_id: str, key: tuple[str, str], url: URL):
        self._cache = cache
        self._tenant_id = tenant_id
        self._key = key
        self._url = url
        self._entry: _Entry | None = None
        self._share: _Share | None = None

    async def __aenter__(self) -> AsyncEngine:
        cache = self._cache
        shares = cache._shares
        if shares is not None:
            self._share = await shares.acquire(self._tenant_id)
        try:
            entry = cache._grant_now(self._key, self._url)
            if entry is not None and _made(entry.ready):
                self._entry = entry
                return entry.ready.result()
            entry = await cache._acquire(self._key, self._url, entry)
            try:
                engine = await asyncio.shield(entry.ready)
            except BaseException:
                cache._unlease(entry)
                raise
            self._entry = entry
            return engine
        except BaseException:
            self._give_back_share()
            raise

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        entry, self._entry = self._entry, None
        try:
            if entry is not None:
                self._cache._unlease(entry)
        finally:
            self._give_back_share()

    def _give_back_share(self) -> None:
        share, self._share = self._share, None
        if share is not None:
            shares = self._cache._shares
            assert shares is not None
            shares.release(share)
