"""The data layer: ``TenantDatabase`` and the isolation strategies (extra: ``postgres``).

Importing this package loads SQLAlchemy; ``import asgi_tenancy`` alone never does.
"""

from .binding import TenantBoundSession
from .database import TenantDatabase
from .database_per_tenant import DatabasePerTenant
from .engines import EngineCache
from .rls import Finding, RowLevelSecurity
from .schema import SchemaPerTenant
from .strategy import IsolationStrategy

__all__ = [
    "DatabasePerTenant",
    "EngineCache",
    "Finding",
    "IsolationStrategy",
    "RowLevelSecurity",
    "SchemaPerTenant",
    "TenantBoundSession",
    "TenantDatabase",
]
