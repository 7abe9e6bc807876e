"""Background jobs that run as their tenant: Celery and arq (docs/jobs.md)."""
