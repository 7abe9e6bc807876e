"""The errors of asgi-tenancy, each with a stable ``code`` and an HTTP ``status_code``.

Messages never carry a tenant identifier: they reach clients as problem+json bodies, and an
identifier echoed back would let a caller probe which tenants exist.

    TenancyError
    ├── TenantContextError            400  no tenant scope, or the wrong one
    │   └── SessionTenantMismatch     400  a session or connection used outside its tenant
    ├── InvalidTenantIdentifier       400  malformed identifier (header, host, path, claim)
    ├── TenantConflict                400  two resolvers named different tenants
    ├── UnsafeQuery                   400  the SQL guard refused a query (carries ``reason``)
    ├── ConfirmationRequired          400  a destructive operation called without confirm
    ├── InvalidToken                  401  a JWT that fails verification
    ├── TenantNotFound                404  unknown, suspended or not a member: one answer
    ├── TenantExists                  409  provisioning: the id, schema, role or database exists
    ├── TenancyUnavailable            503  the tenant cannot be served right now
    │   ├── TenantStoreUnavailable    503  the store raised or timed out
    │   │   └── TenantStoreContractError   the store answered with a malformed record
    │   ├── TenantCapacityExceeded    503  every engine or connection is leased
    │   └── TenantMigrating           503  the tenant's schema is being migrated (Retry-After)
    └── IsolationConfigError          500  refused at start-up: isolation would not hold
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "ConfirmationRequired",
    "InvalidTenantIdentifier",
    "InvalidToken",
    "IsolationConfigError",
    "SessionTenantMismatch",
    "TenancyError",
    "TenancyUnavailable",
    "TenantCapacityExceeded",
    "TenantConflict",
    "TenantContextError",
    "TenantExists",
    "TenantMigrating",
    "TenantNotFound",
    "TenantStoreContractError",
    "TenantStoreUnavailable",
    "UnsafeQuery",
]


class TenancyError(Exception):
    """Base of every error the library raises; catch it to handle a whole family."""

    code: ClassVar[str] = "tenancy_error"
    status_code: ClassVar[int] = 500
    title: ClassVar[str] = "Tenancy error"

    def __init__(self, message: str | None = None, *, hint: str | None = None) -> None:
        self.message = message or self.title
        self.hint = hint
        super().__init__(self.message if hint is None else f"{self.message} (hint: {hint})")


class TenantContextError(TenancyError):
    """Tenant data was reached outside a valid tenant scope, or scopes were mixed."""

    code = "tenant_context"
    status_code = 400
    title = "No valid tenant context"


class SessionTenantMismatch(TenantContextError):
    """A session or connection bound to one tenant was used outside that tenant's scope."""

    code = "session_tenant_mismatch"
    title = "Session used outside its tenant"


class InvalidTenantIdentifier(TenancyError):
    """A tenant identifier is malformed; it never reaches the store or SQL."""

    code = "invalid_tenant_identifier"
    status_code = 400
    title = "Invalid tenant identifier"


class TenantConflict(TenancyError):
    """Two resolvers named different tenants for one request."""

    code = "tenant_conflict"
    status_code = 400
    title = "Conflicting tenant identifiers"


class UnsafeQuery(TenancyError):
    """The SQL guard refused a query; ``reason`` is a stable code for what it refused."""

    code = "unsafe_query"
    status_code = 400
    title = "Query refused"

    def __init__(self, reason: str, message: str | None = None, *, hint: str | None = None) -> None:
        self.reason = reason
        super().__init__(message or f"query refused: {reason}", hint=hint)


class ConfirmationRequired(TenancyError):
    """A destructive operation (dropping a tenant) was called without an explicit confirmation."""

    code = "confirmation_required"
    status_code = 400
    title = "Confirmation required"


class InvalidToken(TenancyError):
    """A bearer token failed verification (signature, expiry, audience, issuer or claim)."""

    code = "invalid_token"
    status_code = 401
    title = "Invalid token"


class TenantNotFound(TenancyError):
    """Unknown, suspended or not a member: the same answer, so none can be told apart."""

    code = "tenant_not_found"
    status_code = 404
    title = "Tenant not found"


class TenantExists(TenancyError):
    """Provisioning found the tenant id registered, or its schema, role or database present."""

    code = "tenant_exists"
    status_code = 409
    title = "Tenant already exists"


class TenancyUnavailable(TenancyError):
    """The tenant cannot be served right now; retrying later may succeed."""

    code = "tenancy_unavailable"
    status_code = 503
    title = "Tenant temporarily unavailable"


class TenantStoreUnavailable(TenancyUnavailable):
    """The tenant store raised or did not answer in time; nothing was scoped."""

    code = "tenant_store_unavailable"
    title = "Tenant store unavailable"


class TenantStoreContractError(TenantStoreUnavailable):
    """The store returned a record for another id, or a malformed one; it is never used."""

    code = "tenant_store_contract"


class TenantCapacityExceeded(TenancyUnavailable):
    """Every engine or connection the configuration allows is leased."""

    code = "tenant_capacity_exceeded"
    title = "Tenant capacity exceeded"


class TenantMigrating(TenancyUnavailable):
    """The tenant's schema is being migrated; answered with ``Retry-After``, never half-read."""

    code = "tenant_migrating"
    title = "Tenant is being migrated"
    retry_after: ClassVar[int] = 5  # seconds: CachedTenantStore's default negative_ttl

    def __init__(self, message: str | None = None, *, tenant: object = None) -> None:
        # The tenant travels to the middleware's membership check (a non-member gets the
        # same 404 as for an unknown tenant); it is never rendered.
        self.tenant = tenant
        super().__init__(message)


class IsolationConfigError(TenancyError):
    """Configuration under which isolation would not hold; raised at start-up, with a hint."""

    code = "isolation_config"
    status_code = 500
    title = "Isolation misconfigured"
