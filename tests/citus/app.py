"""The provisioners the CLI loads in the tests: ``--app tests.citus.app:provisioner`` (row
mode) and ``--app tests.citus.app:schema_provisioner`` (schema mode)."""

from __future__ import annotations

import os

from sqlalchemy.ext.asyncio import create_async_engine

from asgi_tenancy.operations.provisioning import TenantProvisioner
from tests.citus import schema_models
from tests.citus.conftest import APP_ROLE, row_strategy


def provisioner() -> TenantProvisioner:
    engine = create_async_engine(os.environ["TENANCY_TEST_CITUS_ADMIN_URL"])
    return TenantProvisioner(engine, row_strategy(), app_role=APP_ROLE)


def schema_provisioner() -> TenantProvisioner:
    """Schema mode with ``citus=True``: ``tests.citus.app:schema_provisioner``."""
    engine = create_async_engine(os.environ["TENANCY_TEST_CITUS_ADMIN_URL"])
    return schema_models.schema_provisioner(engine, APP_ROLE)
