"""FairShares without a database: caps, order, bounded waits, cancellation, settings, the cache."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy.ext.asyncio import create_async_engine

from asgi_tenancy import IsolationConfigError, Tenant
from asgi_tenancy.errors import TenantOverShare
from asgi_tenancy.sqlalchemy import Binding, FairShares
from asgi_tenancy.sqlalchemy.shares import _TimedBinding

ACME, GLOBEX = Tenant("acme"), Tenant("globex")


async def test_a_tenant_holds_at_most_its_share_and_others_are_not_held_up() -> None:
    shares = FairShares(connections=2, wait=0.01)
    held = [await shares.acquire(ACME), await shares.acquire(ACME)]
    with pytest.raises(TenantOverShare) as caught:
        await shares.acquire(ACME)
    assert caught.value.code == "tenant_over_share"
    assert caught.value.status_code == 503
    assert caught.value.retry_after == 1
    other = await shares.acquire(GLOBEX)  # no wait: another tenant's share
    assert shares.held("acme") == 2
    assert shares.held("globex") == 1
    for share in [*held, other]:
        shares.release(share)
    assert shares.held("acme") == shares.held("globex") == 0


async def test_waiters_are_served_in_arrival_order() -> None:
    shares = FairShares(connections=1, wait=5)
    first = await shares.acquire(ACME)
    order: list[int] = []

    async def wait(n: int) -> None:
        share = await shares.acquire(ACME)
        order.append(n)
        shares.release(share)

    tasks = [asyncio.create_task(wait(n)) for n in range(5)]
    await asyncio.sleep(0)  # every task is queued behind ``first``
    shares.release(first)
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3, 4]
    assert shares.held("acme") == 0


async def test_a_cancelled_waiter_leaves_its_place_and_leaks_nothing() -> None:
    shares = FairShares(connections=1, wait=5)
    first = await shares.acquire(ACME)
    waiting = asyncio.create_task(shares.acquire(ACME))
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    shares.release(first)
    assert shares.held("acme") == 0
    shares.release(await shares.acquire(ACME))  # the share is whole again


async def test_a_share_handed_to_a_waiter_cancelled_before_it_ran_is_passed_on() -> None:
    shares = FairShares(connections=1, wait=5)
    first = await shares.acquire(ACME)
    doomed = asyncio.create_task(shares.acquire(ACME))
    after = asyncio.create_task(shares.acquire(ACME))
    await asyncio.sleep(0)
    shares.release(first)  # handed to ``doomed``, which has not run yet
    doomed.cancel()
    with pytest.raises(asyncio.CancelledError):
        await doomed
    share = await after  # passed on, not lost
    assert shares.held("acme") == 1
    shares.release(share)
    assert shares.held("acme") == 0


async def test_tenant_attributes_set_the_share_and_bad_values_fall_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    shares = FairShares(connections=1, wait=0)
    big = Tenant("big", attributes={"max_connections": 3})
    held = [await shares.acquire(big) for _ in range(3)]
    with pytest.raises(TenantOverShare):
        await shares.acquire(big)
    for bad in ("3", True, 0, -1, 2.5, 10**9):
        tenant = Tenant(f"bad{shares.tenants}", attributes={"max_connections": bad})
        with caplog.at_level(logging.WARNING, "asgi_tenancy.sqlalchemy"):
            share = await shares.acquire(tenant)
        with pytest.raises(TenantOverShare):
            await shares.acquire(tenant)  # the default share: one
        shares.release(share)
    assert "not a whole number" in caplog.text
    for share in held:
        shares.release(share)


def test_settings_are_refused_at_start_up() -> None:
    for bad in (
        {"connections": 0},
        {"connections": True},
        {"wait": -1},
        {"statement_timeout": 0},
        {"statement_timeout": 10**8},
        {"max_tenants": 0},
        {"idle_ttl": 0},
    ):
        with pytest.raises(IsolationConfigError):
            FairShares(**bad)  # type: ignore[arg-type]
    engine = create_async_engine(
        "postgresql+asyncpg://app@localhost/db", pool_size=2, max_overflow=1
    )
    with pytest.raises(IsolationConfigError, match="larger than the whole pool"):
        FairShares(connections=4).attach(engine)
    FairShares(connections=3).attach(engine)
    unbounded = create_async_engine("postgresql+asyncpg://app@localhost/db", max_overflow=-1)
    FairShares(connections=50).attach(unbounded)  # no fixed capacity: no ceiling
    sqlite = create_async_engine("sqlite+aiosqlite://")
    with pytest.raises(IsolationConfigError, match="PostgreSQL"):
        FairShares(statement_timeout=100).attach(sqlite)


async def test_the_cache_keeps_busy_tenants_and_drops_idle_ones() -> None:
    shares = FairShares(connections=1, wait=0, max_tenants=3)
    busy = await shares.acquire(ACME)
    for n in range(20):
        shares.release(await shares.acquire(Tenant(f"t{n}")))
        assert shares.tenants <= 3
    assert shares.held("acme") == 1  # in use: never dropped
    with pytest.raises(TenantOverShare):
        await shares.acquire(ACME)
    shares.release(busy)


async def test_idle_entries_expire() -> None:
    shares = FairShares(connections=1, wait=0, idle_ttl=1e-9)
    shares.release(await shares.acquire(ACME))
    await asyncio.sleep(0.001)  # past the (tiny) TTL on the monotonic clock
    shares.release(await shares.acquire(GLOBEX))
    assert shares.tenants == 1


def test_the_statement_timeout_joins_the_binding_in_one_message() -> None:
    engine = create_async_engine("postgresql+asyncpg://app@localhost/db")
    shares = FairShares(statement_timeout=250)
    shares.attach(engine)
    plain = Binding("SELECT set_config('app.tenant_id', 'acme', true)")
    timed = shares.binding_for(lambda tenant: plain)(ACME)
    assert timed is not None
    assert timed.for_transaction(None, 1) == f"{plain.sql};SET LOCAL statement_timeout = 250"
    assert shares.binding_for(lambda tenant: plain)(ACME) is timed  # cached per tenant
    slow = Tenant("slow", attributes={"statement_timeout_ms": 5000})
    alone = shares.binding_for(lambda tenant: None)(slow)
    assert alone is not None
    assert alone.sql == "SET LOCAL statement_timeout = 5000"

    class PerTransaction(Binding):
        def for_transaction(self, session_key: str | None, counter: int) -> str:
            return f"SELECT {counter}"

    signed = _TimedBinding(PerTransaction("x", alone="SET LOCAL a.b = 1"), "SET LOCAL t = 1")
    assert signed.for_transaction(None, 7) == "SELECT 7;SET LOCAL t = 1"
    assert signed.alone == "SET LOCAL a.b = 1"
    untimed = FairShares(timeout_attribute=None)
    untimed.attach(engine)
    assert untimed.binding_for(lambda tenant: plain)(ACME) is plain


@settings(max_examples=60, deadline=None)
@given(
    limit=st.integers(1, 3),
    steps=st.lists(st.sampled_from(["acquire", "release", "cancel", "cancel_last"]), max_size=30),
)
def test_any_interleaving_keeps_the_cap_and_ends_with_nothing_held(
    limit: int, steps: list[str]
) -> None:
    async def run() -> None:
        shares = FairShares(connections=limit, wait=5)
        held: list[object] = []
        waiting: list[asyncio.Task[object]] = []
        for step in steps:
            if step == "acquire":
                waiting.append(asyncio.create_task(shares.acquire(ACME)))
            elif step == "release" and held:
                shares.release(held.pop(0))  # type: ignore[arg-type]
            elif step == "cancel" and waiting:
                waiting.pop(0).cancel()
            elif step == "cancel_last" and waiting:
                waiting.pop().cancel()
            await asyncio.sleep(0)
            for task in [t for t in waiting if t.done()]:
                waiting.remove(task)
                if not task.cancelled():
                    held.append(task.result())
            assert shares.held("acme") <= limit
            assert shares.held("acme") >= len(held)
        for task in waiting:
            task.cancel()
        for task in waiting:
            with contextlib.suppress(asyncio.CancelledError):
                held.append(await task)
        for share in held:
            shares.release(share)  # type: ignore[arg-type]
        assert shares.held("acme") == 0

    asyncio.run(run())
