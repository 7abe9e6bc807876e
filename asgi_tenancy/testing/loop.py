"""``AdminLoop``: the kit's admin work on an event loop of its own, in a thread.

Each test may run on a fresh event loop (pytest-asyncio's default), and an asyncpg connection
belongs to the loop that opened it; the kit's superuser connections live here instead, so they
stay open across tests: putting the rows back costs a few statements, not a new connection.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = ["AdminLoop"]

T = TypeVar("T")


class AdminLoop:
    """A loop running in a daemon thread, and the admin engines created on it."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="tenancy-kit-admin", daemon=True
        )
        self._thread.start()
        self._engines: dict[str, AsyncEngine] = {}

    def __repr__(self) -> str:
        return f"AdminLoop(engines={len(self._engines)})"

    def run(self, work: Coroutine[Any, Any, T]) -> T:
        """Run ``work`` on the admin loop from synchronous code (never from the loop itself)."""
        return asyncio.run_coroutine_threadsafe(work, self._loop).result()

    def submit(self, work: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Start ``work`` on the admin loop; its future, to wait on later."""
        return asyncio.run_coroutine_threadsafe(work, self._loop)

    async def run_async(self, work: Coroutine[Any, Any, T]) -> T:
        """Run ``work`` on the admin loop from another running loop."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(work, self._loop))

    def engine(self, key: str, make: Callable[[], AsyncEngine]) -> AsyncEngine:
        """The engine for ``key``, made by ``make()`` once (call on the admin loop only)."""
        engine = self._engines.get(key)
        if engine is None:
            engine = self._engines[key] = make()
        return engine

    async def _dispose(self) -> None:
        engines, self._engines = list(self._engines.values()), {}
        for engine in engines:
            await engine.dispose()

    async def forget(self, key: str) -> None:
        """Dispose of ``key``'s engine (before its database is dropped)."""
        engine = self._engines.pop(key, None)
        if engine is not None:
            await engine.dispose()

    def close(self) -> None:
        """Dispose of every engine, then stop the loop and its thread."""
        if self._loop.is_closed():
            return
        self.run(self._dispose())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
