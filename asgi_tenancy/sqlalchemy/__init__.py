"""The data layer: ``TenantDatabase`` and the isolation strategies (extra: ``postgres``).

Importing this package loads SQLAlchemy; ``import asgi_tenancy`` alone never does.
"""

from .binding import TenantBoundSession
from .database import TenantDatabase
from .rls import Finding, RowLevelSecurity
from .store import SqlAlchemyTenantStore, create_tenants_table, tenants_table
from .strategy import IsolationStrategy

__all__ = [
    "Finding",
    "IsolationStrategy",
    "RowLevelSecurity",
    "SqlAlchemyTenantStore",
    "TenantBoundSession",
    "TenantDatabase",
    "create_tenants_table",
    "tenants_table",
]
