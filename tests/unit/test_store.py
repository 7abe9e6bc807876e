from __future__ import annotations

import asyncio
from typing import Any

import pytest

from asgi_tenancy import (
    CachedTenantStore,
    InMemoryTenantStore,
    InvalidTenantIdentifier,
    IsolationConfigError,
    Tenant,
    TenantNotFound,
    TenantStatus,
    TenantStoreUnavailable,
)
from asgi_tenancy.errors import TenantStoreContractError
from asgi_tenancy.store import load_tenant

ACME = Tenant("acme")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class CountingStore:
    """Answers from a dict and counts calls; optionally blocks until released."""

    def __init__(self, *tenants: Tenant, gate: bool = False) -> None:
        self.tenants = {t.id: t for t in tenants}
        self.calls: list[str] = []
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        if not gate:
            self.release.set()

    async def get(self, tenant_id: str) -> Tenant | None:
        self.calls.append(tenant_id)
        self.started.set()
        await self.release.wait()
        return self.tenants.get(tenant_id)


class BuggyStore:
    def __init__(self, answer: Any = None, error: Exception | None = None) -> None:
        self.answer = answer
        self.error = error
        self.calls = 0

    async def get(self, tenant_id: str) -> Any:
        self.calls += 1
        if self.error is not None:
            raise self.error
        return self.answer


class HangingStore:
    async def get(self, tenant_id: str) -> Tenant | None:
        await asyncio.Event().wait()
        return None


async def test_hundred_concurrent_cold_requests_make_one_store_call() -> None:
    store = CountingStore(ACME, gate=True)
    cached = CachedTenantStore(store)
    tasks = [asyncio.create_task(cached.get("acme")) for _ in range(100)]
    await store.started.wait()
    store.release.set()
    results = await asyncio.gather(*tasks)
    assert store.calls == ["acme"]
    assert all(result is ACME for result in results)


async def test_a_cached_tenant_is_served_until_its_ttl_ends() -> None:
    clock = Clock()
    store = CountingStore(ACME)
    cached = CachedTenantStore(store, ttl=30, clock=clock)
    assert await cached.get("acme") is ACME
    clock.now += 29.9
    assert await cached.get("acme") is ACME
    assert len(store.calls) == 1
    clock.now += 0.2
    assert await cached.get("acme") is ACME
    assert len(store.calls) == 2


async def test_unknown_tenants_are_cached_for_the_short_negative_ttl() -> None:
    clock = Clock()
    store = CountingStore()
    cached = CachedTenantStore(store, ttl=60, negative_ttl=2, clock=clock)
    assert await cached.get("ghost") is None
    assert await cached.get("ghost") is None
    assert len(store.calls) == 1
    clock.now += 2.1
    store.tenants["ghost"] = Tenant("ghost")
    assert await cached.get("ghost") == Tenant("ghost")
    assert len(store.calls) == 2


async def test_invalidate_makes_a_suspension_visible_at_once() -> None:
    store = InMemoryTenantStore([ACME])
    cached = CachedTenantStore(store)
    assert await load_tenant(cached, "acme") is ACME
    store.put(Tenant("acme", TenantStatus.SUSPENDED))
    assert await load_tenant(cached, "acme") is ACME  # still cached
    cached.invalidate("acme")
    with pytest.raises(TenantNotFound):
        await load_tenant(cached, "acme")


async def test_clear_forgets_everything() -> None:
    store = CountingStore(ACME)
    cached = CachedTenantStore(store)
    await cached.get("acme")
    cached.clear()
    assert len(cached) == 0
    await cached.get("acme")
    assert len(store.calls) == 2


async def test_an_answer_loaded_across_an_invalidation_is_not_cached() -> None:
    store = CountingStore(ACME, gate=True)
    cached = CachedTenantStore(store)
    first = asyncio.create_task(cached.get("acme"))
    await store.started.wait()
    cached.invalidate("acme")
    store.release.set()
    assert await first is ACME
    assert len(cached) == 0


async def test_the_cache_never_holds_more_than_max_entries() -> None:
    tenants = [Tenant(f"t{i}") for i in range(5)]
    store = CountingStore(*tenants)
    cached = CachedTenantStore(store, max_entries=3)
    for tenant in tenants:
        await cached.get(tenant.id)
    assert len(cached) == 3
    await cached.get("t0")  # evicted, least recently used: loaded again
    assert store.calls.count("t0") == 2
    await cached.get("t4")  # recent: still cached
    assert store.calls.count("t4") == 1


async def test_a_store_that_raises_is_unavailable_and_not_cached() -> None:
    store = BuggyStore(error=ConnectionError("db down"))
    cached = CachedTenantStore(store)
    for _ in range(2):
        with pytest.raises(TenantStoreUnavailable) as info:
            await cached.get("acme")
        assert "acme" not in str(info.value)
    assert store.calls == 2


async def test_a_store_that_hangs_past_the_timeout_is_unavailable() -> None:
    cached = CachedTenantStore(HangingStore(), timeout=0.01)
    with pytest.raises(TenantStoreUnavailable):
        await cached.get("acme")


async def test_a_record_for_another_tenant_is_a_contract_error() -> None:
    cached = CachedTenantStore(BuggyStore(answer=Tenant("globex")))
    with pytest.raises(TenantStoreContractError):
        await cached.get("acme")
    assert len(cached) == 0


@pytest.mark.parametrize("answer", [{"id": "acme"}, "acme", 1, ("acme",)])
async def test_a_malformed_record_is_a_contract_error(answer: Any) -> None:
    with pytest.raises(TenantStoreContractError):
        await CachedTenantStore(BuggyStore(answer=answer)).get("acme")


async def test_an_invalid_identifier_never_reaches_the_store() -> None:
    store = CountingStore(ACME)
    with pytest.raises(InvalidTenantIdentifier):
        await CachedTenantStore(store).get("acme'; drop table tenants; --")
    assert store.calls == []


async def test_a_cancelled_waiter_does_not_cancel_the_load_for_others() -> None:
    store = CountingStore(ACME, gate=True)
    cached = CachedTenantStore(store)
    impatient = asyncio.create_task(cached.get("acme"))
    patient = asyncio.create_task(cached.get("acme"))
    await store.started.wait()
    impatient.cancel()
    store.release.set()
    assert await patient is ACME
    with pytest.raises(asyncio.CancelledError):
        await impatient
    assert store.calls == ["acme"]


async def test_load_tenant_through_the_cache_answers_suspended_as_not_found() -> None:
    cached = CachedTenantStore(InMemoryTenantStore([Tenant("acme", TenantStatus.SUSPENDED)]))
    with pytest.raises(TenantNotFound):
        await load_tenant(cached, "acme")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"ttl": 0},
        {"ttl": -1},
        {"negative_ttl": 0},
        {"timeout": 0},
        {"ttl": 1, "negative_ttl": 5},
        {"max_entries": 0},
        {"max_entries": 1.5},
    ],
)
def test_cache_configuration_is_checked(kwargs: dict[str, Any]) -> None:
    with pytest.raises(IsolationConfigError):
        CachedTenantStore(InMemoryTenantStore(), **kwargs)


def test_cache_needs_a_store() -> None:
    with pytest.raises(IsolationConfigError):
        CachedTenantStore(object())  # type: ignore[arg-type]
