"""A test kit for applications: the library's adversarial guarantees, for your own schema.

A pytest plugin (opt-in: ``pytest_plugins = ["asgi_tenancy.testing"]`` in the top-level
``conftest.py``). Describe the application once with ``TenancyKit``; the ``tenancy`` fixture
gives two tenants whose keys collide on your tables and strategy, the app role and an admin
connection; ``leak_tests(kit)`` generates a leak test per tenant model. Loads SQLAlchemy and
pytest: ``import asgi_tenancy`` never imports it.

PYTEST_DONT_REWRITE: the kit raises its own errors, so a conftest may import it before pytest
registers it as a plugin.
"""

from .harness import TwoTenants
from .kit import Layout, Provision, TenancyKit
from .leaks import PROBES, LeakFound, leak_tests, run_probe
from .plugin import (
    KitDatabases,
    tenancy,
    tenancy_database_url,
    tenancy_databases,
    tenancy_kit,
    tenant_a,
    tenant_b,
)
from .server import KitServer

__all__ = [
    "PROBES",
    "KitDatabases",
    "KitServer",
    "Layout",
    "LeakFound",
    "Provision",
    "TenancyKit",
    "TwoTenants",
    "leak_tests",
    "run_probe",
    "tenancy",
    "tenancy_database_url",
    "tenancy_databases",
    "tenancy_kit",
    "tenant_a",
    "tenant_b",
]
