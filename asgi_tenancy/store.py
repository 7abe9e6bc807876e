"""Where tenants come from: the ``TenantStore`` protocol and the hardened way to read one.

Stores are the application's (a table, a service, a config file). Whatever they answer passes
through ``load_tenant``, which refuses a record for another id or a malformed one, so a buggy
store fails closed instead of scoping a request to the wrong tenant.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, runtime_checkable

from .errors import TenantNotFound, TenantStoreContractError, TenantStoreUnavailable
from .tenant import Tenant, validate_tenant_id

__all__ = ["InMemoryTenantStore", "TenantStore", "load_tenant"]


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
            raise ValueError("duplicate tenant id")
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

    The identifier is validated before the store sees it; a store that raises becomes
    ``TenantStoreUnavailable`` (503) and one that breaks its contract a contract error.
    """
    validate_tenant_id(tenant_id)
    try:
        record = await store.get(tenant_id)
    except TenantStoreUnavailable:
        raise
    except Exception as exc:
        raise TenantStoreUnavailable() from exc
    tenant = check_record(tenant_id, record)
    if tenant is None or not tenant.is_active:
        raise TenantNotFound()
    return tenant
