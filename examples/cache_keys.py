"""Cache keys and object-storage paths of the current tenant (docs/keys.md)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from redis.asyncio import Redis

from asgi_tenancy.keyspace import KeySpace

cache = KeySpace("cache")  # cache:<tenant>:...
uploads = KeySpace("uploads", separator="/")  # uploads/<tenant>/...


async def cached_profile(
    redis: Redis, user_id: int | str, load: Callable[[int | str], Awaitable[str]]
) -> str:
    """Read-through cache: two tenants' user 42 are two keys, whoever asks."""
    key = cache.key("profile", user_id)  # raises outside a tenant scope
    if (hit := await redis.get(key)) is not None:
        return hit.decode()
    value = await load(user_id)
    await redis.set(key, value, ex=300)
    return value


async def clear_tenant_cache(redis: Redis) -> int:
    """Delete every cache key of the current tenant, and only those."""
    deleted = 0
    async for key in redis.scan_iter(match=cache.pattern(), count=500):
        deleted += await redis.delete(key)
    return deleted


def invoice_path(number: int) -> str:
    """An object name under the tenant's prefix: ``uploads/acme/invoices/17.pdf``."""
    return uploads.key("invoices", f"{number}.pdf")


def invoices_prefix() -> str:
    """List the tenant's invoices with it: it never matches ``invoices-old`` or ``acme-corp``."""
    return uploads.prefix("invoices")
