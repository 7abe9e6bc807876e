"""Where tenants come from: the ``TenantStore`` protocol and the hardened way to read one.

Stores are the application's (a table, a service, a config file). Whatever they answer passes
through ``load_tenant``, which refuses a record for another id or a malformed one, so a buggy
store fails closed instead of scoping a request to the wrong tenant.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Protocol, runtime_checkable

from .errors import (
    IsolationConfigError,
    TenantMigrating,
    TenantNotFound,
    TenantStoreContractError,
    TenantStoreUnavailable,
)
from .tenant import Tenant, TenantStatus, validate_tenant_id

__all__ = [
    "CachedTenantStore",
    "InMemoryTenantStore",
    "TenantStore",
    "active_tenant",
    "check_record",
    "load_tenant",
    "load_validated",
]


@runtime_checkable
class TenantStore(Protocol):
    """Bring your own: ``get`` returns the tenant with that id, or ``None`` when unknown."""

    async def get(self, tenant_id: str) -> Tenant | None: ...


class InMemoryTenantStore:
    """Tenants held in a dict: for tests, demos and small fixed deployments."""

    def __init__(self, tenants: Iterable[Tenant] = ()) -> None:
        self._tenants: dict[str, Tenant] = {}
        for tenant in tenants:
            self.add(tenant)

    def add(self, tenant: Tenant) -> None:
        if not isinstance(tenant, Tenant):
            raise TypeError("InMemoryTenantStore holds Tenant values")
        if tenant.id in self._tenants:
            raise TenantStoreContractError("duplicate tenant id")
        self._tenants[tenant.id] = tenant

    def put(self, tenant: Tenant) -> None:
        """Add or replace a tenant (status changes, attribute updates)."""
        if not isinstance(tenant, Tenant):
            raise TypeError("InMemoryTenantStore holds Tenant values")
        self._tenants[tenant.id] = tenant

    def remove(self, tenant_id: str) -> None:
        self._tenants.pop(tenant_id, None)

    async def get(self, tenant_id: str) -> Tenant | None:
        return self._tenants.get(tenant_id)


def check_record(tenant_id: str, record: object) -> Tenant | None:
    """Hold a store's answer to its contract: ``None`` or a ``Tenant`` with the id asked for."""
    if record is None:
        return None
    if not isinstance(record, Tenant):
        raise TenantStoreContractError("tenant store returned something that is not a Tenant")
    if record.id != tenant_id:
        raise TenantStoreContractError("tenant store returned a record for another tenant")
    return record


async def load_tenant(store: TenantStore, tenant_id: str) -> Tenant:
    """Load an active tenant, or raise: unknown and suspended are the same ``TenantNotFound``.

    A tenant being migrated raises ``TenantMigrating`` (503, ``Retry-After``). The identifier
    is validated before the store sees it; a store that raises becomes
    ``TenantStoreUnavailable`` (503) and one that breaks its contract a contract error.
    """
    return await load_validated(store, validate_tenant_id(tenant_id))


async def load_validated(store: TenantStore, tenant_id: str) -> Tenant:
    """``load_tenant`` for an identifier already validated (the middleware's resolvers did);
    a cache hit of ``CachedTenantStore`` costs no coroutine."""
    record: object
    if type(store) is CachedTenantStore:
        record = await store.get(tenant_id)  # checked when it was loaded
    else:
        try:
            record = check_record(tenant_id, await store.get(tenant_id))
        except (TenantStoreUnavailable, TenantStoreContractError):
            raise
        except Exception as exc:
            raise TenantStoreUnavailable() from exc
    return active_tenant(record)


def active_tenant(record: object) -> Tenant:
    """A checked store answer as the tenant to serve; unknown and suspended are one 404."""
    if record is None:
        raise TenantNotFound()
    assert isinstance(record, Tenant)
    status = record.status
    if status is not TenantStatus.ACTIVE:
        if status is TenantStatus.MIGRATING:
            raise TenantMigrating(tenant=record)
        raise TenantNotFound()
    return record


#: ``CachedTenantStore.peek``'s answer when the cache holds nothing fresh for the id.
MISS = object()


class CachedTenantStore:
    """A TTL cache in front of a slow store, with single-flight loading and a hard bound.

    Holds at most ``max_entries`` answers (least recently used evicted first), each at most
    ``ttl`` seconds old (``negative_ttl`` for "unknown" and "migrating"), so a suspension or
    deletion is seen within ``ttl`` seconds, at once after ``invalidate``. Concurrent misses
    for one id share a single store call; a store that raises or exceeds ``timeout`` gives
    ``TenantStoreUnavailable``, which is never cached.
    """

    def __init__(
        self,
        store: TenantStore,
        *,
        ttl: float = 60.0,
        negative_ttl: float = 5.0,
        max_entries: int = 10_000,
        timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not callable(getattr(store, "get", None)):
            raise IsolationConfigError("CachedTenantStore wraps a TenantStore")
        for name, value in (("ttl", ttl), ("negative_ttl", negative_ttl), ("timeout", timeout)):
            if not isinstance(value, int | float) or value <= 0:
                raise IsolationConfigError(f"CachedTenantStore {name} must be a positive number")
        if negative_ttl > ttl:
            raise IsolationConfigError("CachedTenantStore negative_ttl must not exceed ttl")
        if not isinstance(max_entries, int) or max_entries < 1:
            raise IsolationConfigError("CachedTenantStore max_entries must be a positive integer")
        self.store = store
        self.ttl = float(ttl)
        self.negative_ttl = float(negative_ttl)
        self.max_entries = max_entries
        self.timeout = float(timeout)
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, Tenant | None]] = OrderedDict()
        self._loading: dict[str, asyncio.Task[Tenant | None]] = {}
        self._generation = 0

    def __len__(self) -> int:
        return len(self._entries)

    def peek(self, tenant_id: str) -> object:
        """The fresh cached answer (a ``Tenant`` or ``None``) for a validated id, or a miss
        marker: the hot path of a request, with no coroutine."""
        entry = self._entries.get(tenant_id)
        if entry is not None and entry[0] > self._clock():
            self._entries.move_to_end(tenant_id)
            return entry[1]
        return MISS

    async def get(self, tenant_id: str) -> Tenant | None:
        validate_tenant_id(tenant_id)
        entry = self._entries.get(tenant_id)
        if entry is not None:
            if entry[0] > self._clock():
                self._entries.move_to_end(tenant_id)
                return entry[1]
            del self._entries[tenant_id]
        task = self._loading.get(tenant_id)
        if task is None:
            task = asyncio.ensure_future(self._load(tenant_id, self._generation))
            self._loading[tenant_id] = task
            task.add_done_callback(lambda done: self._loaded(tenant_id, done))
        # Shielded: one caller giving up (a client disconnect) never cancels the others' load.
        return await asyncio.shield(task)

    def invalidate(self, tenant_id: str) -> None:
        """Forget one tenant now (after a suspension, a deletion or an attribute change)."""
        self._generation += 1
        self._entries.pop(tenant_id, None)
        self._loading.pop(tenant_id, None)

    def clear(self) -> None:
        """Forget every tenant."""
        self._generation += 1
        self._entries.clear()
        self._loading.clear()

    async def _load(self, tenant_id: str, generation: int) -> Tenant | None:
        try:
            async with asyncio.timeout(self.timeout):
                record = await self.store.get(tenant_id)
        except TenantStoreUnavailable:
            raise
        except Exception as exc:  # TimeoutError included
            raise TenantStoreUnavailable() from exc
        tenant = check_record(tenant_id, record)
        if generation == self._generation:  # an invalidation since makes this answer stale
            # "Migrating" is short-lived, like "unknown": held no longer than negative_ttl, so a
            # tenant is served again within seconds of its migration's end.
            brief = tenant is None or tenant.status is TenantStatus.MIGRATING
            ttl = self.negative_ttl if brief else self.ttl
            self._entries[tenant_id] = (self._clock() + ttl, tenant)
            self._entries.move_to_end(tenant_id)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return tenant

    def _loaded(self, tenant_id: str, task: asyncio.Task[Tenant | None]) -> None:
        if self._loading.get(tenant_id) is task:
            del self._loading[tenant_id]
        if not task.cancelled():
            task.exception()  # retrieved here, so a load nobody awaited never logs as lost
