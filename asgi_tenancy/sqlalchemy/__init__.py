"""The data layer: ``TenantDatabase`` and the isolation strategies (extra: ``postgres``).

Importing this package loads SQLAlchemy; ``import asgi_tenancy`` alone never does.
"""

from .audit import AuditReport, audit, audit_provisioner
from .binding import TenantBoundSession
from .config import isolation_from_env, strategy_from_env
from .database import TenantDatabase
from .database_per_tenant import DatabasePerTenant
from .engines import EngineCache
from .provisioning import TenantProvisioner
from .query_scoping import ALLOW_UNSCOPED, QueryScoping, allow_unscoped
from .rls import Finding, RowLevelSecurity
from .schema import SchemaPerTenant
from .store import SqlAlchemyTenantStore, create_tenants_table, tenants_table
from .strategy import IsolationStrategy

__all__ = [
    "ALLOW_UNSCOPED",
    "AuditReport",
    "DatabasePerTenant",
    "EngineCache",
    "Finding",
    "IsolationStrategy",
    "QueryScoping",
    "RowLevelSecurity",
    "SchemaPerTenant",
    "SqlAlchemyTenantStore",
    "TenantBoundSession",
    "TenantDatabase",
    "TenantProvisioner",
    "allow_unscoped",
    "audit",
    "audit_provisioner",
    "create_tenants_table",
    "isolation_from_env",
    "strategy_from_env",
    "tenants_table",
]
