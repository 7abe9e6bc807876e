"""asgi-tenancy: fail-closed multi-tenancy for ASGI applications.

Importing this package loads neither SQLAlchemy, a database driver nor FastAPI: the request
path's data layer lives in ``asgi_tenancy.sqlalchemy``, operations (provisioning, migrations,
the audit) in ``asgi_tenancy.operations``, the FastAPI glue in ``asgi_tenancy.fastapi`` and the
SQL guard in ``asgi_tenancy.sqlguard``. Every error type is in ``asgi_tenancy.errors``; the
ones an application handles most are re-exported here.
"""

from .context import (
    capture,
    central_scope,
    current_tenant,
    current_tenant_or_none,
    restore,
    tenant_scope,
)
from .errors import (
    InvalidTenantIdentifier,
    InvalidToken,
    IsolationConfigError,
    SessionTenantMismatch,
    TenancyError,
    TenancyUnavailable,
    TenantConflict,
    TenantContextError,
    TenantNotFound,
    TenantStoreUnavailable,
    UnsafeQuery,
)
from .log import TenantLogFilter
from .middleware import TenancyMiddleware
from .resolvers import (
    ChainPolicy,
    HeaderResolver,
    JWTClaimResolver,
    PathResolver,
    Resolver,
    SubdomainResolver,
)
from .store import CachedTenantStore, InMemoryTenantStore, TenantStore
from .tenant import Tenant, TenantStatus

__version__ = "0.1.0"

__all__ = [
    "CachedTenantStore",
    "ChainPolicy",
    "HeaderResolver",
    "InMemoryTenantStore",
    "InvalidTenantIdentifier",
    "InvalidToken",
    "IsolationConfigError",
    "JWTClaimResolver",
    "PathResolver",
    "Resolver",
    "SessionTenantMismatch",
    "SubdomainResolver",
    "TenancyError",
    "TenancyMiddleware",
    "TenancyUnavailable",
    "Tenant",
    "TenantConflict",
    "TenantContextError",
    "TenantLogFilter",
    "TenantNotFound",
    "TenantStatus",
    "TenantStore",
    "TenantStoreUnavailable",
    "UnsafeQuery",
    "__version__",
    "capture",
    "central_scope",
    "current_tenant",
    "current_tenant_or_none",
    "restore",
    "tenant_scope",
]
