"""asgi-tenancy: fail-closed multi-tenancy for ASGI applications.

Importing this package loads neither SQLAlchemy, a database driver nor FastAPI: the data layer
lives in ``asgi_tenancy.sqlalchemy`` and the FastAPI glue in ``asgi_tenancy.fastapi``.
"""

from .context import (
    bind_context,
    capture,
    central_scope,
    current_tenant,
    current_tenant_or_none,
    in_central_scope,
    restore,
    run_in_thread,
    tenant_scope,
)
from .errors import (
    ConfirmationRequired,
    InvalidTenantIdentifier,
    InvalidToken,
    IsolationConfigError,
    SessionTenantMismatch,
    TenancyError,
    TenancyUnavailable,
    TenantCapacityExceeded,
    TenantConflict,
    TenantContextError,
    TenantExists,
    TenantMigrating,
    TenantNotFound,
    TenantStoreContractError,
    TenantStoreUnavailable,
    UnsafeQuery,
)
from .log import TenantLogFilter
from .middleware import Authorize, TenancyMiddleware
from .resolvers import (
    ChainPolicy,
    HeaderResolver,
    JWTClaimResolver,
    PathResolver,
    Resolver,
    ResolverChain,
    SubdomainResolver,
)
from .store import CachedTenantStore, InMemoryTenantStore, TenantStore, check_record, load_tenant
from .tenant import Tenant, TenantStatus, validate_tenant_id

__version__ = "0.1.0"

__all__ = [
    "Authorize",
    "CachedTenantStore",
    "ChainPolicy",
    "ConfirmationRequired",
    "HeaderResolver",
    "InMemoryTenantStore",
    "InvalidTenantIdentifier",
    "InvalidToken",
    "IsolationConfigError",
    "JWTClaimResolver",
    "PathResolver",
    "Resolver",
    "ResolverChain",
    "SessionTenantMismatch",
    "SubdomainResolver",
    "TenancyError",
    "TenancyMiddleware",
    "TenancyUnavailable",
    "Tenant",
    "TenantCapacityExceeded",
    "TenantConflict",
    "TenantContextError",
    "TenantExists",
    "TenantLogFilter",
    "TenantMigrating",
    "TenantNotFound",
    "TenantStatus",
    "TenantStore",
    "TenantStoreContractError",
    "TenantStoreUnavailable",
    "UnsafeQuery",
    "__version__",
    "bind_context",
    "capture",
    "central_scope",
    "check_record",
    "current_tenant",
    "current_tenant_or_none",
    "in_central_scope",
    "load_tenant",
    "restore",
    "run_in_thread",
    "tenant_scope",
    "validate_tenant_id",
]
