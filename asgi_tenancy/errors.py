"""The errors of asgi-tenancy, each with a stable ``code`` and an HTTP ``status_code``.

Messages never carry a tenant identifier: they reach clients as problem+json bodies, and an
identifier echoed back would let a caller probe which tenants exist.

    TenancyError
    ├── TenantContextError            400  no tenant scope, or the wrong one
    │   └── SessionTenantMismatch     400  a session or connection used outside its tenant
    ├── InvalidTenantIdentifier       400  malformed identifier (header, host, path, claim)
    ├── TenantConflict                400  two resolvers named different tenants
    ├── UnsafeQuery                   400  the SQL guard refused a query (carries ``reason``)
    ├── GuardedQueryFailed            400  the server refused a guarded query (carries ``sqlstate``)
    │   └── GuardedResultTooLarge     400  a guarded query's result passed its byte cap
    ├── ConfirmationRequired          400  a destructive operation called without confirm
    ├── InvalidToken                  401  a JWT that fails verification
    ├── TenantNotFound                404  unknown, suspended or not a member: one answer
    ├── TenantExists                  409  provisioning: the id, schema, role or database exists
    ├── InvalidValue                  400  the database refused a value the request carried
    ├── TenantPlacementError          500  the tenant's schema or database is misplaced
    ├── TenancyUnavailable            503  the tenant cannot be served right now
    │   ├── TenantStoreUnavailable    503  the store raised or timed out
    │   │   └── TenantStoreContractError   the store answered with a malformed record
    │   ├── TenantCapacityExceeded    503  every engine or connection is leased
    │   ├── TenantOverShare           503  the tenant holds its whole fair share (Retry-After)
    │   ├── TenantMigrating           503  the tenant's schema is being migrated (Retry-After)
    │   ├── TenantSchemaMissing       503  the tenant's schema does not exist
    │   ├── DatabaseNotValidated      503  sessions before validate() passed
    │   ├── TenancyShuttingDown       503  the database layer is closing
    │   ├── DatabaseUnavailable       503  refused, lost or killed connection (Retry-After)
    │   ├── DatabaseConflict          503  serialization failure or deadlock (Retry-After)
    │   └── DatabaseTimeout           504  statement or lock timeout
    │       └── GuardedQueryTimeout   504  a guarded query ran past its statement timeout
    └── IsolationConfigError          500  refused at start-up: isolation would not hold

Errors from the database driver become these types in one place,
``asgi_tenancy.sqlalchemy.failures``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from .checks import Finding

__all__ = [
    "ConfirmationRequired",
    "DatabaseConflict",
    "DatabaseNotValidated",
    "DatabaseTimeout",
    "DatabaseUnavailable",
    "GuardedQueryFailed",
    "GuardedQueryTimeout",
    "GuardedResultTooLarge",
    "InvalidTenantIdentifier",
    "InvalidToken",
    "InvalidValue",
    "IsolationConfigError",
    "SessionTenantMismatch",
    "TenancyError",
    "TenancyShuttingDown",
    "TenancyUnavailable",
    "TenantCapacityExceeded",
    "TenantConflict",
    "TenantContextError",
    "TenantExists",
    "TenantMigrating",
    "TenantNotFound",
    "TenantOverShare",
    "TenantPlacementError",
    "TenantSchemaMissing",
    "TenantStoreContractError",
    "TenantStoreUnavailable",
    "UnsafeQuery",
]


class TenancyError(Exception):
    """Base of every error the library raises; catch it to handle a whole family."""

    code: ClassVar[str] = "tenancy_error"
    status_code: ClassVar[int] = 500
    title: ClassVar[str] = "Tenancy error"
    #: Seconds a client should wait before retrying (the ``Retry-After`` header), if any.
    retry_after: ClassVar[int | None] = None

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


class GuardedQueryFailed(TenancyError):
    """The server refused a query the SQL guard accepted: the user's own SQL, so its message."""

    code = "guarded_query_failed"
    status_code = 400
    title = "Query failed"

    def __init__(self, message: str | None = None, *, sqlstate: str | None = None) -> None:
        self.sqlstate = sqlstate
        super().__init__(message)


class GuardedResultTooLarge(GuardedQueryFailed):
    """A guarded query's result passed ``max_bytes``; the server stopped before sending more."""

    code = "guarded_result_too_large"
    title = "Query result too large"


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


class InvalidValue(TenancyError):
    """The database refused a value the request carried (out of range, malformed, NUL)."""

    code = "invalid_value"
    status_code = 400
    title = "Invalid value"


class TenantPlacementError(TenancyError):
    """The tenant's schema or database is unusable or claimed by another tenant; fix its record.

    ``check`` is the audit's code for the same condition (``D002``...), for the operator's log.
    """

    code = "tenant_placement"
    status_code = 500
    title = "Tenant misplaced"

    def __init__(
        self, message: str | None = None, *, hint: str | None = None, check: str | None = None
    ) -> None:
        self.check = check
        super().__init__(message, hint=hint)


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


class TenantOverShare(TenancyUnavailable):
    """The tenant already holds every connection of its fair share and none freed in time;
    the other tenants are still served (``FairShares``, ``DatabasePerTenant``)."""

    code = "tenant_over_share"
    title = "Tenant over its share"
    retry_after = 1


class TenantMigrating(TenancyUnavailable):
    """The tenant's schema is being migrated; answered with ``Retry-After``, never half-read."""

    code = "tenant_migrating"
    title = "Tenant is being migrated"
    retry_after = 5  # seconds: CachedTenantStore's default negative_ttl

    def __init__(self, message: str | None = None, *, tenant: object = None) -> None:
        # The tenant travels to the middleware's membership check (a non-member gets the
        # same 404 as for an unknown tenant); it is never rendered.
        self.tenant = tenant
        super().__init__(message)


class TenantSchemaMissing(TenancyUnavailable):
    """The tenant's schema does not exist (yet): never another schema's rows instead."""

    code = "tenant_schema_missing"
    title = "Tenant schema missing"


class DatabaseNotValidated(TenancyUnavailable):
    """A session was asked for before ``validate()`` passed: nothing is served unchecked."""

    code = "not_validated"
    title = "Isolation not validated"


class TenancyShuttingDown(TenancyUnavailable):
    """The database layer is closing; no new session starts."""

    code = "shutting_down"
    title = "Shutting down"


class DatabaseUnavailable(TenancyUnavailable):
    """The connection was refused, lost or killed, or the server is shutting down."""

    code = "database_unavailable"
    title = "Database unavailable"
    retry_after = 1


class DatabaseConflict(TenancyUnavailable):
    """A serialization failure or a deadlock: the transaction was rolled back; retry it."""

    code = "database_conflict"
    title = "Transaction conflict"
    retry_after = 1


class DatabaseTimeout(TenancyUnavailable):
    """A statement or lock timeout ended the query."""

    code = "database_timeout"
    status_code = 504
    title = "Database timeout"
    retry_after = 1


class GuardedQueryTimeout(DatabaseTimeout):
    """A guarded query ran past ``timeout_ms`` and the server cancelled it (``SqlGuard.run``)."""

    code = "guarded_query_timeout"
    title = "Query timed out"


class IsolationConfigError(TenancyError):
    """Configuration under which isolation would not hold; raised at start-up, with a hint.

    ``findings`` carries every reason found (``validate()``, the audit), one per line in
    ``str(error)``: codes stay data, never flattened into one long message.
    """

    code = "isolation_config"
    status_code = 500
    title = "Isolation misconfigured"

    def __init__(
        self,
        message: str | None = None,
        *,
        hint: str | None = None,
        findings: Iterable[Finding] = (),
    ) -> None:
        self.findings: tuple[Finding, ...] = tuple(findings)
        super().__init__(message, hint=hint)

    def __str__(self) -> str:
        lines = [super().__str__()]
        lines += [f"  {finding}" for finding in self.findings]
        return "\n".join(lines)
