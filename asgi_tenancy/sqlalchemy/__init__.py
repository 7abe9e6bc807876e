"""The data layer: ``TenantDatabase`` and the isolation strategies (extra: ``postgres``).

Importing this package loads SQLAlchemy; ``import asgi_tenancy`` alone never does.
"""

from .binding import TenantBoundSession
from .database import TenantDatabase
from .query_scoping import ALLOW_UNSCOPED, QueryScoping, allow_unscoped
from .rls import Finding, RowLevelSecurity
from .strategy import IsolationStrategy

__all__ = [
    "ALLOW_UNSCOPED",
    "Finding",
    "IsolationStrategy",
    "QueryScoping",
    "RowLevelSecurity",
    "TenantBoundSession",
    "TenantDatabase",
    "allow_unscoped",
]
