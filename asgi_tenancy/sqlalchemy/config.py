"""``strategy_from_env``: the isolation strategy named by ``TENANCY_ISOLATION``, built once."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

from sqlalchemy import MetaData

from ..errors import IsolationConfigError
from .database_per_tenant import DatabasePerTenant
from .query_scoping import QueryScoping
from .rls import RowLevelSecurity
from .schema import SchemaPerTenant
from .strategy import IsolationStrategy

__all__ = ["ENV_VAR", "ISOLATIONS", "isolation_from_env", "strategy_from_env"]

ENV_VAR = "TENANCY_ISOLATION"
ISOLATIONS = ("row", "schema", "database", "query")


def isolation_from_env(
    environ: Mapping[str, str] | None = None, *, default: str | None = None
) -> str:
    """The isolation named by ``TENANCY_ISOLATION`` (or ``default`` when unset or empty).

    Unknown values, and no value without a default, raise ``IsolationConfigError``: the
    application never falls back to a strategy nobody chose.
    """
    raw = (os.environ if environ is None else environ).get(ENV_VAR, "").strip()
    value = raw.lower() or default
    if value is None:
        raise IsolationConfigError(
            f"{ENV_VAR} is not set", hint=f"set {ENV_VAR} to one of: {', '.join(ISOLATIONS)}"
        )
    if value not in ISOLATIONS:
        # The value is configuration, not a tenant identifier: safe to name, but bounded.
        raise IsolationConfigError(
            f"{ENV_VAR}={value[:40]!r} is not an isolation strategy",
            hint=f"use one of: {', '.join(ISOLATIONS)}",
        )
    return value


def strategy_from_env(
    *,
    metadata: MetaData | None = None,
    tenant_column: str = "tenant_id",
    shared_tables: Iterable[str] = (),
    shared_schema: str | None = "shared",
    options: Mapping[str, Mapping[str, Any]] | None = None,
    environ: Mapping[str, str] | None = None,
    default: str | None = None,
) -> IsolationStrategy:
    """Build the strategy ``TENANCY_ISOLATION`` names (row, schema, database or query).

    ``metadata`` is required by row, schema and query; ``shared_tables`` are the tables every
    tenant reads (under schema isolation they must live in ``shared_schema``). ``options``
    passes extra keyword arguments to one strategy, keyed by its name:
    ``{"database": {"max_engines": 20}}``.
    """
    isolation = isolation_from_env(environ, default=default)
    extra = dict(options or {})
    unknown = sorted(set(extra) - set(ISOLATIONS))
    if unknown:
        raise IsolationConfigError(
            f"options for unknown strategies: {', '.join(unknown)}",
            hint=f"key options by one of: {', '.join(ISOLATIONS)}",
        )
    own = dict(extra.get(isolation, {}))
    shared = frozenset(shared_tables)
    if isolation == "database":
        return DatabasePerTenant(**own)
    if metadata is None:
        raise IsolationConfigError(
            f"{ENV_VAR}={isolation} needs the application's MetaData",
            hint="strategy_from_env(metadata=Base.metadata, ...)",
        )
    if isolation == "row":
        return RowLevelSecurity(
            metadata=metadata, tenant_column=tenant_column, shared_tables=shared, **own
        )
    if isolation == "query":
        return QueryScoping(
            metadata=metadata, tenant_column=tenant_column, shared_tables=shared, **own
        )
    strategy = SchemaPerTenant(metadata=metadata, shared_schema=shared_schema, **own)
    in_shared_schema = {t.name for t in strategy.shared_tables()}
    misplaced = sorted(shared - in_shared_schema)
    if misplaced:
        raise IsolationConfigError(
            f"shared tables outside the shared schema: {', '.join(misplaced)}",
            hint=f"give them __table_args__ = {{'schema': {shared_schema!r}}}",
        )
    return strategy
