"""EngineCache without a database: leases, eviction, capacity, failures and shutdown."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from asgi_tenancy import TenancyUnavailable
from asgi_tenancy.errors import TenantCapacityExceeded, TenantOverShare
from asgi_tenancy.sqlalchemy import EngineCache

SECRET = "s3cret-pw"


class FakeEngine:
    """Stands in for an AsyncEngine: the cache only awaits ``dispose()``."""

    def __init__(self, url: URL, *, fail_dispose: bool = False) -> None:
        self.url = url
        self.fail_dispose = fail_dispose
        self.disposed = 0

    async def dispose(self) -> None:
        self.disposed += 1
        if self.fail_dispose:
            raise RuntimeError("dispose failed")


def _url(n: int) -> URL:
    return make_url(f"postgresql+asyncpg://app:{SECRET}@db{n}.internal/tenant_{n}")


def _cache(max_engines: int, **fakes: Any) -> tuple[EngineCache, list[FakeEngine]]:
    made: list[FakeEngine] = []

    async def factory(tenant_id: str, url: URL) -> AsyncEngine:
        engine = FakeEngine(url, **fakes)
        made.append(engine)
        return cast(AsyncEngine, engine)

    return EngineCache(factory, max_engines=max_engines, acquire_timeout=0.01), made


async def test_idle_engines_are_evicted_least_recently_used_first() -> None:
    cache, made = _cache(2)
    for n in (1, 2, 1, 3):
        async with cache.lease(f"t{n}", _url(n)):
            pass
    assert [e.url.database for e in made] == ["tenant_1", "tenant_2", "tenant_3"]
    assert [e.disposed for e in made] == [0, 1, 0]
    assert len(cache) == 2


async def test_all_leased_raises_capacity_and_evicts_no_leased_engine() -> None:
    cache, made = _cache(1)
    async with cache.lease("t1", _url(1)) as engine:
        with pytest.raises(TenantCapacityExceeded):
            async with cache.lease("t2", _url(2)):
                pass  # pragma: no cover
        assert cast(Any, engine).disposed == 0
    assert len(made) == 1


async def test_a_failed_creation_is_not_cached_and_the_next_try_runs() -> None:
    attempts = 0

    async def factory(tenant_id: str, url: URL) -> AsyncEngine:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise TenancyUnavailable("unreachable")
        return cast(AsyncEngine, FakeEngine(url))

    cache = EngineCache(factory, max_engines=2, acquire_timeout=0.0)
    with pytest.raises(TenancyUnavailable):
        async with cache.lease("t1", _url(1)):
            pass  # pragma: no cover
    assert len(cache) == 0
    async with cache.lease("t1", _url(1)):
        pass
    assert attempts == 2


async def test_concurrent_first_leases_share_one_creation() -> None:
    made = 0

    async def factory(tenant_id: str, url: URL) -> AsyncEngine:
        nonlocal made
        made += 1
        return cast(AsyncEngine, FakeEngine(url))

    cache = EngineCache(factory, max_engines=1, acquire_timeout=0.0)

    async def one() -> None:
        async with cache.lease("t1", _url(1)):
            pass

    # The creation is scheduled behind all 50 tasks: every one of them finds it pending.
    await asyncio.gather(*(one() for _ in range(50)))
    assert made == 1


async def test_a_disposal_failure_keeps_the_engine_counted() -> None:
    cache, made = _cache(1, fail_dispose=True)
    async with cache.lease("t1", _url(1)):
        pass
    with pytest.raises(TenantCapacityExceeded):
        async with cache.lease("t2", _url(2)):
            pass  # pragma: no cover
    assert made[0].disposed >= 1
    assert len(cache) == 1


async def test_close_refuses_new_leases_and_waits_for_the_last_one() -> None:
    cache, made = _cache(2)
    leased, release = asyncio.Event(), asyncio.Event()

    async def holder() -> None:
        async with cache.lease("t1", _url(1)):
            leased.set()
            await release.wait()

    held = asyncio.create_task(holder())
    await leased.wait()
    closing = asyncio.create_task(cache.close())

    async def late() -> None:
        with pytest.raises(TenancyUnavailable):
            async with cache.lease("t2", _url(2)):
                pass  # pragma: no cover

    await asyncio.create_task(late())  # runs after close() started (tasks run in order)
    assert not closing.done()
    release.set()
    await asyncio.gather(held, closing)
    assert made[0].disposed == 1
    assert len(cache) == 0


def test_repr_shows_counts_not_urls() -> None:
    cache, _ = _cache(3)
    assert SECRET not in repr(cache)
    assert SECRET not in repr(_url(1))


async def test_a_waiting_tenant_is_served_before_a_busy_one_re_leases() -> None:
    cache, made = _cache(1)
    cache.acquire_timeout = 5
    order: list[str] = []
    release_first, release_waiter = asyncio.Event(), asyncio.Event()
    holding = asyncio.Event()
    leased = [asyncio.Event() for _ in range(3)]

    async def lease(n: int, until: asyncio.Event | None = None) -> None:
        async with cache.lease(f"t{n}", _url(n)):
            order.append(f"t{n}")
            leased[len(order) - 1].set()
            holding.set()
            if until is not None:
                await until.wait()

    first = asyncio.create_task(lease(1, release_first))
    await holding.wait()
    waiter = asyncio.create_task(lease(2, release_waiter))
    await asyncio.sleep(0)  # t2 is in line (every engine leased)
    again = asyncio.create_task(lease(1))  # t1's engine exists, but t2 came first
    await asyncio.sleep(0)
    assert order == ["t1"]
    release_first.set()
    await first
    await leased[1].wait()
    assert order == ["t1", "t2"]  # not t1 again: its engine went to the one waiting
    release_waiter.set()
    await asyncio.gather(waiter, again)
    assert order == ["t1", "t2", "t1"]
    assert [e.disposed for e in made] == [1, 1, 0]


async def test_a_burst_over_16_tenants_with_8_engines_serves_every_tenant() -> None:
    made: list[FakeEngine] = []

    async def factory(tenant_id: str, url: URL) -> AsyncEngine:
        engine = FakeEngine(url)
        made.append(engine)
        await asyncio.sleep(0)  # creation takes a turn of the loop, as a connect does
        return cast(AsyncEngine, engine)

    cache = EngineCache(factory, max_engines=8, acquire_timeout=1.0, per_key=2)
    wins: dict[str, int] = {f"t{n}": 0 for n in range(16)}
    refusals: dict[str, int] = dict.fromkeys(wins, 0)

    async def request(n: int) -> None:
        try:
            async with cache.lease(f"t{n}", _url(n)):
                for _ in range(3):  # a short query
                    await asyncio.sleep(0)
        except TenancyUnavailable:
            refusals[f"t{n}"] += 1
            return
        wins[f"t{n}"] += 1

    await asyncio.gather(*(request(i % 16) for i in range(2000)))
    assert all(count > 0 for count in wins.values()), wins
    assert sum(wins.values()) + sum(refusals.values()) == 2000
    assert len(cache) <= 8
    assert cache.leased == 0
    await cache.close()


async def test_a_tenant_holds_at_most_its_pool_of_leases() -> None:
    cache, _ = _cache(4)
    cache_with_share = EngineCache(cache._factory, max_engines=4, acquire_timeout=0.01, per_key=2)
    async with cache_with_share.lease("t1", _url(1)), cache_with_share.lease("t1", _url(1)):
        with pytest.raises(TenantOverShare):
            async with cache_with_share.lease("t1", _url(1)):
                pass  # pragma: no cover
        async with cache_with_share.lease("t2", _url(2)):
            pass  # another tenant is not held up


async def test_a_waiter_cancelled_in_line_leaves_it() -> None:
    cache, _ = _cache(1)
    cache.acquire_timeout = 5
    held, release = asyncio.Event(), asyncio.Event()

    async def holder() -> None:
        async with cache.lease("t1", _url(1)):
            held.set()
            await release.wait()

    first = asyncio.create_task(holder())
    await held.wait()
    waiting = asyncio.create_task(cache.lease("t2", _url(2)).__aenter__())
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    release.set()
    await first
    async with cache.lease("t3", _url(3)):  # the line is empty: served at once
        pass
    assert cache.leased == 0
