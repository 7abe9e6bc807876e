"""SchemaPerTenant: one PostgreSQL schema per tenant, chosen by a transaction-local search_path.

``strategy`` holds the strategy (names, binding, DDL), ``checks`` its start-up checks
(S001-S007), ``placement`` what operations ask of it (create, drop, migrate, audit).
"""

from .strategy import SchemaPerTenant

__all__ = ["SchemaPerTenant"]
