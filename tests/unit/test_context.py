from __future__ import annotations

import asyncio
import json
import random
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from asgi_tenancy import (
    InMemoryTenantStore,
    IsolationConfigError,
    Tenant,
    TenantContextError,
    TenantNotFound,
    TenantStatus,
    TenantStoreUnavailable,
    capture,
    central_scope,
    current_tenant,
    current_tenant_or_none,
    restore,
    tenant_scope,
)
from asgi_tenancy.context import bind_context, in_central_scope
from asgi_tenancy.errors import TenantStoreContractError

ACME = Tenant("acme")
GLOBEX = Tenant("globex")


def test_outside_a_scope_current_tenant_raises() -> None:
    with pytest.raises(TenantContextError):
        current_tenant()
    assert current_tenant_or_none() is None


def test_scope_sets_and_restores() -> None:
    with tenant_scope(ACME) as tenant:
        assert tenant is ACME
        assert current_tenant() is ACME
    assert current_tenant_or_none() is None


async def test_async_scope_sets_and_restores() -> None:
    async with tenant_scope(ACME) as tenant:
        assert current_tenant() is tenant
    assert current_tenant_or_none() is None


def test_same_tenant_reentry_is_allowed_and_unwinds_in_order() -> None:
    scope = tenant_scope(ACME)
    with scope, tenant_scope(Tenant("acme")), scope:
        assert current_tenant().id == "acme"
    assert current_tenant_or_none() is None


def test_other_tenant_inside_a_scope_raises_and_keeps_the_first() -> None:
    with tenant_scope(ACME):
        with pytest.raises(TenantContextError), tenant_scope(GLOBEX):
            pass  # pragma: no cover
        assert current_tenant() is ACME


def test_central_and_tenant_scopes_do_not_nest() -> None:
    with tenant_scope(ACME), pytest.raises(TenantContextError), central_scope(reason="x"):
        pass  # pragma: no cover
    with central_scope(reason="nightly report"):
        assert in_central_scope()
        with pytest.raises(TenantContextError):
            current_tenant()
        assert current_tenant_or_none() is None
        with pytest.raises(TenantContextError), tenant_scope(ACME):
            pass  # pragma: no cover
        with central_scope(reason="nested"):
            assert in_central_scope()
        assert in_central_scope()
    assert not in_central_scope()


def test_central_scope_needs_a_reason_and_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(ValueError, match="reason"):
        central_scope(reason="  ")
    caplog.set_level("INFO", logger="asgi_tenancy.central")
    with central_scope(reason="billing export"):
        pass
    assert "billing export" in caplog.text


def test_suspended_tenant_cannot_be_entered() -> None:
    with pytest.raises(TenantNotFound):
        tenant_scope(Tenant("acme", status=TenantStatus.SUSPENDED))


def test_scope_is_restored_after_an_exception() -> None:
    with pytest.raises(RuntimeError), tenant_scope(ACME):
        raise RuntimeError("boom")
    assert current_tenant_or_none() is None


async def test_scope_is_restored_after_cancellation() -> None:
    entered = asyncio.Event()

    async def worker() -> None:
        async with tenant_scope(ACME):
            entered.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(worker())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert current_tenant_or_none() is None


def test_scope_is_restored_when_a_generator_is_closed() -> None:
    def gen() -> Iterator[str]:
        with tenant_scope(ACME):
            yield current_tenant().id
            yield "never"

    g = gen()
    assert next(g) == "acme"
    assert current_tenant().id == "acme"  # a suspended generator holds its scope, like any with
    g.close()
    assert current_tenant_or_none() is None


async def test_async_generator_closed_elsewhere_never_leaves_its_scope() -> None:
    async def agen() -> AsyncIterator[str]:
        async with tenant_scope(ACME):
            yield current_tenant().id

    g = agen()
    assert await g.__anext__() == "acme"
    await g.aclose()
    assert current_tenant_or_none() is None


async def test_tasks_inherit_the_scope() -> None:
    async with tenant_scope(ACME):
        task = asyncio.create_task(asyncio.sleep(0, result=None))
        await task
        assert await asyncio.create_task(_read_tenant()) == "acme"
    assert await asyncio.create_task(_read_or_none()) is None


async def _read_tenant() -> str:
    await asyncio.sleep(0)
    return current_tenant().id


async def _read_or_none() -> str | None:
    tenant = current_tenant_or_none()
    return None if tenant is None else tenant.id


async def test_thousand_concurrent_tasks_across_ten_tenants_never_cross() -> None:
    tenants = [Tenant(f"tenant-{i}") for i in range(10)]
    rng = random.Random(7)
    crossings = 0

    async def request(tenant: Tenant) -> None:
        nonlocal crossings
        async with tenant_scope(tenant):
            for _ in range(5):
                await asyncio.sleep(0 if rng.random() < 0.5 else 0.0001)
                if current_tenant().id != tenant.id:
                    crossings += 1

    await asyncio.gather(*(request(tenants[i % 10]) for i in range(1000)))
    assert crossings == 0
    assert current_tenant_or_none() is None


async def test_to_thread_and_bind_context_carry_the_tenant() -> None:
    def read() -> tuple[str, int]:
        return current_tenant().id, threading.get_ident()

    async with tenant_scope(ACME):
        tenant_id, ident = await asyncio.to_thread(read)  # copies the context: no helper needed
        assert tenant_id == "acme"
        assert ident != threading.get_ident()
        bound = bind_context(read)
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda _: bound()[0], range(20)))
        assert results == ["acme"] * 20
        with pytest.raises(TenantContextError):
            pool.submit(read).result()


async def test_snapshot_round_trips_through_json() -> None:
    store = InMemoryTenantStore([ACME, GLOBEX])
    async with tenant_scope(ACME):
        snapshot = json.loads(json.dumps(capture()))
    assert current_tenant_or_none() is None
    async with restore(snapshot, store) as tenant:
        assert tenant == ACME
        assert current_tenant().id == "acme"
    assert current_tenant_or_none() is None


def test_capture_outside_a_tenant_scope_raises() -> None:
    with pytest.raises(TenantContextError):
        capture()
    with central_scope(reason="test"), pytest.raises(TenantContextError):
        capture()


async def test_restore_of_a_suspended_or_deleted_tenant_fails() -> None:
    store = InMemoryTenantStore([ACME])
    async with tenant_scope(ACME):
        snapshot = capture()
    store.put(Tenant("acme", status=TenantStatus.SUSPENDED))
    with pytest.raises(TenantNotFound):
        async with restore(snapshot, store):
            pass  # pragma: no cover
    store.remove("acme")
    with pytest.raises(TenantNotFound):
        async with restore(snapshot, store):
            pass  # pragma: no cover


@pytest.mark.parametrize(
    "snapshot",
    [
        {},
        {"version": 2, "tenant_id": "acme"},
        {"version": 1},
        {"version": 1, "tenant_id": "acme", "central": True},
        ["acme"],
    ],
)
async def test_malformed_snapshots_are_refused(snapshot: object) -> None:
    with pytest.raises(TenantContextError):
        async with restore(snapshot, InMemoryTenantStore([ACME])):  # type: ignore[arg-type]
            pass  # pragma: no cover


async def test_restore_holds_the_store_to_its_contract() -> None:
    class WrongStore:
        async def get(self, tenant_id: str) -> Tenant | None:
            return GLOBEX

    class BrokenStore:
        async def get(self, tenant_id: str) -> Tenant | None:
            raise ConnectionError("down")

    with pytest.raises(TenantStoreContractError):
        async with restore({"version": 1, "tenant_id": "acme"}, WrongStore()):
            pass  # pragma: no cover
    with pytest.raises(TenantStoreUnavailable):
        async with restore({"version": 1, "tenant_id": "acme"}, BrokenStore()):
            pass  # pragma: no cover
    assert current_tenant_or_none() is None


KEY, OLD_KEY = b"k" * 32, b"o" * 32


async def test_a_signed_snapshot_restores_only_as_captured() -> None:
    store = InMemoryTenantStore([ACME, GLOBEX])
    async with tenant_scope(ACME):
        snapshot = json.loads(json.dumps(capture(key=KEY)))
    async with tenant_scope(GLOBEX):
        other = capture(key=KEY)
    async with restore(snapshot, store, keys=KEY) as tenant:
        assert tenant == ACME
    edits = [
        {**snapshot, "tenant_id": "globex"},  # another tenant, the old signature
        {**snapshot, "tenant_id": "globex", "mac": other["mac"][:-1] + "0"},
        {**snapshot, "mac": other["mac"]},  # another tenant's signature
        {**snapshot, "mac": snapshot["mac"].upper()},
        {"version": 1, "tenant_id": "acme"},  # stripped of its signature
        {**snapshot, "central": True},  # claims central scope
        {**snapshot, "tenant_id": None},
        {**snapshot, "mac": 0},
    ]
    for edited in edits:
        with pytest.raises(TenantContextError):
            async with restore(edited, store, keys=KEY):
                pass  # pragma: no cover
    with pytest.raises(TenantContextError, match="needs its keys"):
        async with restore(snapshot, store):
            pass  # pragma: no cover
    assert current_tenant_or_none() is None


async def test_snapshot_keys_rotate_and_must_be_long() -> None:
    store = InMemoryTenantStore([ACME])
    async with tenant_scope(ACME):
        old = capture(key=OLD_KEY)
        new = capture(key=KEY.decode())
    for snapshot in (old, new):
        async with restore(snapshot, store, keys=[KEY, OLD_KEY]) as tenant:
            assert tenant == ACME
    with pytest.raises(TenantContextError):
        async with restore(old, store, keys=[KEY]):  # the rotation is over
            pass  # pragma: no cover
    for bad in (b"short", [], [KEY, b""]):
        with pytest.raises(IsolationConfigError):
            async with restore(new, store, keys=bad):
                pass  # pragma: no cover
    async with tenant_scope(ACME):
        with pytest.raises(IsolationConfigError):
            capture(key="too short")
