"""What every job-queue integration shares: the snapshot sent with a job and the scope it runs in.

Enqueueing inside a tenant scope attaches a signed snapshot; anywhere else, nothing. A worker
restores the snapshot through the store (so a tenant suspended since enqueue fails with
``TenantNotFound``), runs a job marked central in ``central_scope``, and any other job with no
tenant at all. A job never starts inside a scope left over from a previous one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

from ._keys import secret_keys
from .context import (
    SnapshotKeys,
    capture,
    central_scope,
    current_tenant_or_none,
    in_central_scope,
    restore,
)
from .errors import IsolationConfigError, TenantContextError
from .store import TenantStore
from .tenant import Tenant


def signing_keys(keys: SnapshotKeys | None) -> list[bytes]:
    """The snapshot keys as bytes (the first signs); a job queue never carries unsigned ones."""
    if keys is None:
        raise IsolationConfigError(
            "tenant jobs need snapshot keys",
            hint="pass keys=[secrets.token_bytes(32)] (the same on producers and workers)",
        )
    return secret_keys(keys, what="snapshot")


def check_store(store: object) -> TenantStore:
    if not callable(getattr(store, "get", None)):
        raise IsolationConfigError("tenant jobs need a TenantStore", hint="store=...")
    return store  # type: ignore[return-value]


def check_reason(reason: object) -> str:
    if not isinstance(reason, str) or not reason.strip():
        raise IsolationConfigError(
            "a central job needs a non-empty reason", hint="central='nightly usage report'"
        )
    return reason.strip()


def outgoing_snapshot(keys: list[bytes]) -> dict[str, Any] | None:
    """The signed snapshot of the current tenant scope, or ``None`` outside one."""
    if current_tenant_or_none() is None:
        return None
    return capture(key=keys[0])


def check_clean_start() -> None:
    """Refuse to start a job inside a scope: it could only be one left by a previous job."""
    if current_tenant_or_none() is not None or in_central_scope():
        raise TenantContextError("a job started inside a tenant or central scope")


@asynccontextmanager
async def job_scope(
    snapshot: object, *, store: TenantStore, keys: list[bytes], central: str | None
) -> AsyncIterator[Tenant | None]:
    """The scope a job runs in: central, the snapshot's tenant (re-loaded), or none at all."""
    if central is not None:
        async with central_scope(reason=central):
            yield None
        return
    if snapshot is None:
        yield None
        return
    if not isinstance(snapshot, Mapping):
        raise TenantContextError("not a tenant context snapshot")
    async with restore(snapshot, store, keys=keys) as tenant:
        yield tenant


async def load_job_tenant(snapshot: object, *, store: TenantStore, keys: list[bytes]) -> Tenant:
    """The snapshot's tenant, verified and re-loaded through the store (a sync job's scope)."""
    if not isinstance(snapshot, Mapping):
        raise TenantContextError("not a tenant context snapshot")
    async with restore(snapshot, store, keys=keys) as tenant:
        return tenant
