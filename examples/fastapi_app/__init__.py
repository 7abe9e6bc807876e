"""A small multi-tenant SaaS API: projects and tasks, isolated per tenant by asgi-tenancy."""
