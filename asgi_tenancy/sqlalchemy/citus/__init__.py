"""Citus (distributed PostgreSQL): the row binding workers receive, distribution DDL, checks,
and moving a tenant between nodes."""

from ..moves import TenantMove
from .distribution import Distribution
from .move import move_tenant, plan_tenant_move

__all__ = ["Distribution", "TenantMove", "move_tenant", "plan_tenant_move"]
