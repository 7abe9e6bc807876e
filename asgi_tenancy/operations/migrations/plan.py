"""Where a migration run takes each kind of target: the tenant head and the shared head."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from alembic.config import Config
from alembic.script import ScriptDirectory

from ...errors import IsolationConfigError

__all__ = ["SHARED_BRANCH", "Plan", "load_config", "plan"]

SHARED_BRANCH = "shared"


@dataclass(frozen=True, slots=True)
class Plan:
    """The one tenant head, and the head of the ``shared`` branch if there is one."""

    tenant_head: str
    shared_head: str | None


def plan(config: Config) -> Plan:
    script = ScriptDirectory.from_config(config)
    heads = set(script.get_heads())
    shared: set[str] = set()
    if any(SHARED_BRANCH in (rev.branch_labels or ()) for rev in script.walk_revisions()):
        shared = {rev.revision for rev in script.get_revisions(f"{SHARED_BRANCH}@head") if rev}
    tenant = heads - shared
    if len(tenant) != 1 or len(shared) > 1:
        raise IsolationConfigError(
            "the tenant migrations must have exactly one head",
            hint="merge the heads (alembic merge heads); shared-schema revisions go on a "
            f"branch labelled {SHARED_BRANCH!r}",
        )
    return Plan(tenant.pop(), shared.pop() if shared else None)


def load_config(config: Config | str | os.PathLike[str]) -> Config:
    """An Alembic ``Config`` from a path; ``script_location`` relative to the ini file."""
    if isinstance(config, Config):
        return config
    path = Path(config)
    if not path.is_file():
        raise IsolationConfigError(
            "the Alembic config file does not exist",
            hint="run from the directory of alembic.ini, or pass --config PATH",
        )
    loaded = Config(str(path))
    location = loaded.get_main_option("script_location")
    if location and ":" not in location and not Path(location).is_absolute():
        # Relative to the ini file, wherever the command runs from.
        loaded.set_main_option("script_location", str((path.parent / location).resolve()))
    return loaded
