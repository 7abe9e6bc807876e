"""The ``env.py`` side of migrations: what one Alembic run does inside its target.

The runner (``asgi_tenancy.operations.migrations``, ``asgi-tenancy migrate``) opens one
transaction per target (the shared schema, one tenant schema or one tenant database) and hands
it to ``env.py`` in ``config.attributes[TARGET_KEY]``; ``run_target`` configures Alembic for it.
Copied ``env.py`` files import ``run_target`` from here, so this module stays where it is.
Needs the ``migrations`` extra (Alembic) only when ``run_target`` runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.resources import files
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..errors import IsolationConfigError
from .postgres import qualified_name, quote_ident, quote_literal

__all__ = [
    "TARGET_KEY",
    "VERSION_TABLE",
    "MigrationTarget",
    "env_template",
    "read_revision",
    "run_target",
]

TARGET_KEY = "asgi_tenancy.target"
VERSION_TABLE = "alembic_version"


@dataclass(frozen=True, slots=True)
class MigrationTarget:
    """What ``env.py`` migrates: a connection already in a transaction, and where to put it.

    ``schema`` is the tenant (or shared) schema, ``None`` for a tenant database, whose default
    schema is used. ``tenant_id`` is ``None`` for the shared target.
    """

    connection: Connection
    tenant_id: str | None
    schema: str | None

    @property
    def shared(self) -> bool:
        return self.tenant_id is None


def run_target(target_metadata: sa.MetaData | None = None, **configure: Any) -> None:
    """Body of ``env.py``: configure Alembic for the runner's target and run its migrations.

    Refuses to run without a target: a plain ``alembic upgrade`` would migrate whatever schema
    the connection happens to search (``public``), never a tenant.
    """
    from alembic import context

    target = context.config.attributes.get(TARGET_KEY)
    if not isinstance(target, MigrationTarget):
        raise IsolationConfigError(
            "this env.py migrates the target asgi-tenancy hands it, and none was given",
            hint="run `asgi-tenancy migrate --all` or `asgi-tenancy migrate TENANT`",
        )
    connection = target.connection
    if target.schema is not None:
        # Raw op.execute() SQL finds the target's tables; the translate map places op.* DDL.
        path = quote_literal(quote_ident(target.schema))
        connection.exec_driver_sql(f"SELECT set_config('search_path', {path}, true)")
        connection = connection.execution_options(schema_translate_map={None: target.schema})
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        version_table_schema=target.schema,
        transaction_per_migration=False,
        **configure,
    )
    with context.begin_transaction():  # a no-op: the runner's transaction holds the target
        context.run_migrations()


def read_revision(connection: Connection, schema: str | None) -> str | None:
    """The target's Alembic revision (heads joined by commas), ``None`` without a version table."""
    table = qualified_name(schema, VERSION_TABLE)
    exists = connection.execute(sa.text("SELECT to_regclass(:t) IS NOT NULL"), {"t": table})
    if not exists.scalar():
        return None
    rows = connection.execute(sa.text(f"SELECT version_num FROM {table} ORDER BY 1")).scalars()
    return ",".join(rows) or None


def env_template() -> str:
    """The text of the ``env.py`` shipped with the package: copy it into your script folder."""
    return files("asgi_tenancy.sqlalchemy").joinpath("alembic_env.py.txt").read_text()
