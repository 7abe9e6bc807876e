"""Alembic across tenants: ``migrate_tenants`` (``asgi-tenancy migrate``). Extra: ``migrations``.

``plan`` reads the script directory's heads, ``runner`` walks the tenants and the registry
marks, ``executor`` runs one target's transaction (here or in a worker process), ``report``
holds the results. What ``env.py`` runs inside each target is ``asgi_tenancy.sqlalchemy
.migrations.run_target``.
"""

from ...sqlalchemy.migrations import TARGET_KEY, MigrationTarget, env_template, run_target
from .plan import SHARED_BRANCH
from .report import MigrationObserver, MigrationReport, MigrationResult, MigrationStatus
from .runner import migrate_tenants

__all__ = [
    "SHARED_BRANCH",
    "TARGET_KEY",
    "MigrationObserver",
    "MigrationReport",
    "MigrationResult",
    "MigrationStatus",
    "MigrationTarget",
    "env_template",
    "migrate_tenants",
    "run_target",
]
