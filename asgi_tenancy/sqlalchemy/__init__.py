"""The request path: ``TenantDatabase``, the isolation strategies, the tenant store.

Importing this package loads SQLAlchemy; ``import asgi_tenancy`` alone never does. It never
imports ``asgi_tenancy.operations`` (provisioning, migrations, the audit): those sit above it.
"""

from ..checks import Finding
from .config import isolation_from_env, strategy_from_env
from .database import TenantDatabase
from .database_per_tenant import DatabasePerTenant, EngineCache
from .query_scoping import ALLOW_UNSCOPED, QueryScoping, allow_unscoped
from .rls import RowLevelSecurity
from .schema import SchemaPerTenant
from .session import TenantBoundSession
from .shares import FairShares
from .store import SqlAlchemyTenantStore, create_tenants_table, tenants_table
from .strategy import Binding, IsolationStrategy

__all__ = [
    "ALLOW_UNSCOPED",
    "Binding",
    "DatabasePerTenant",
    "EngineCache",
    "FairShares",
    "Finding",
    "IsolationStrategy",
    "QueryScoping",
    "RowLevelSecurity",
    "SchemaPerTenant",
    "SqlAlchemyTenantStore",
    "TenantBoundSession",
    "TenantDatabase",
    "allow_unscoped",
    "create_tenants_table",
    "isolation_from_env",
    "strategy_from_env",
    "tenants_table",
]
