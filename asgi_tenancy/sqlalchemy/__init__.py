"""The data layer: ``TenantDatabase`` and the isolation strategies (extra: ``postgres``).

Importing this package loads SQLAlchemy; ``import asgi_tenancy`` alone never does.
"""

from .binding import TenantBoundSession
from .database import TenantDatabase
from .query_scoping import ALLOW_UNSCOPED, QueryScoping, allow_unscoped
from .rls import Finding, RowLevelSecurity
from .store import SqlAlchemyTenantStore, create_tenants_table, tenants_table
from .strategy import IsolationStrategy

__all__ = [
    "ALLOW_UNSCOPED",
    "Finding",
    "IsolationStrategy",
    "QueryScoping",
    "RowLevelSecurity",
    "SqlAlchemyTenantStore",
    "TenantBoundSession",
    "TenantDatabase",
    "allow_unscoped",
    "create_tenants_table",
    "tenants_table",
]
