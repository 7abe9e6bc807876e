"""The application module ``test_cli_tenants`` points ``--app`` at: a provisioner from env."""

from __future__ import annotations

import os

from sqlalchemy.ext.asyncio import create_async_engine

from asgi_tenancy.operations import TenantProvisioner
from asgi_tenancy.sqlalchemy import DatabasePerTenant, SchemaPerTenant
from tests.conftest import APP_ROLE
from tests.lifecycle.conftest import RUN, metadata


def provisioner() -> TenantProvisioner:
    """Built when the command runs, on the test module's database."""
    admin = create_async_engine(os.environ["LIFECYCLE_ADMIN_URL"])
    if os.environ.get("LIFECYCLE_STRATEGY") == "database":
        return TenantProvisioner(
            admin,
            DatabasePerTenant(),
            app_role=APP_ROLE,
            metadata=metadata,
            app_url=os.environ["LIFECYCLE_APP_URL"],
            database_naming=f"{RUN}_{{id}}",
        )
    strategy = SchemaPerTenant(metadata=metadata, naming=f"{RUN}_{{id}}")
    return TenantProvisioner(admin, strategy, app_role=APP_ROLE)


not_a_provisioner = object()
