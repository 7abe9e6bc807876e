"""The explicit tenant predicate on ORM statements, and tenant stamping of new rows.

QueryScoping relies on it alone; RowLevelSecurity adds it on top of the database policy so
indexes (and distributed engines such as Citus) see the tenant in every query.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import event, inspect
from sqlalchemy.orm import Mapper, ORMExecuteState, Session, UOWTransaction, with_loader_criteria

from ..errors import IsolationConfigError, TenantContextError
from .binding import TENANT_KEY, TenantBoundSession

__all__ = ["CRITERIA_KEY", "TenantCriteria"]

CRITERIA_KEY = "asgi_tenancy.criteria"  # Session.info: the TenantCriteria of the session

# mapper -> attribute key of its tenant column. Read by the criteria lambda through a global, so
# SQLAlchemy's lambda caching tracks only the tenant id (a bound parameter), never the key.
# Bounded by the number of mapped classes.
_TENANT_ATTRS: dict[Mapper[Any], str] = {}


def _tenant_attr(cls: Any) -> Any:
    return getattr(cls, _TENANT_ATTRS[cls.__mapper__])


def _register(mapper: Mapper[Any], key: str) -> None:
    if _TENANT_ATTRS.setdefault(mapper, key) != key:
        raise IsolationConfigError("a mapped class cannot have two different tenant columns")


class TenantCriteria:
    """Which mapped classes carry the tenant column, and how they are filtered and stamped."""

    def __init__(self, tenant_column: str = "tenant_id") -> None:
        self.tenant_column = tenant_column
        self._reach: dict[Mapper[Any], tuple[Mapper[Any], ...]] = {}

    def is_tenant_mapper(self, mapper: Mapper[Any]) -> bool:
        return self.tenant_column in mapper.columns

    def _reachable(self, mapper: Mapper[Any]) -> tuple[Mapper[Any], ...]:
        """Tenant mappers a statement on ``mapper`` can load, relationships followed (cached)."""
        found = self._reach.get(mapper)
        if found is None:
            seen: set[Mapper[Any]] = set()
            todo = [mapper]
            while todo:
                current = todo.pop()
                for m in current.self_and_descendants:
                    if m in seen:
                        continue
                    seen.add(m)
                    todo.extend(rel.mapper for rel in m.relationships)
            found = tuple(m for m in seen if self.is_tenant_mapper(m))
            for m in found:
                _register(m, m.get_property_by_column(m.columns[self.tenant_column]).key)
            self._reach[mapper] = found
        return found

    def apply(self, state: ORMExecuteState, tenant_id: str) -> None:
        if not (state.is_select or state.is_update or state.is_delete):
            return
        mappers: set[Mapper[Any]] = set()
        for mapper in state.all_mappers:
            mappers.update(self._reachable(mapper))
        if not mappers:
            return
        options = [
            with_loader_criteria(
                m.class_, lambda cls: _tenant_attr(cls) == tenant_id, include_aliases=True
            )
            for m in sorted(mappers, key=lambda m: m.class_.__qualname__)
        ]
        state.statement = state.statement.options(*options)

    def stamp(self, session: Session, tenant_id: str) -> None:
        """Fill the tenant column of new objects; refuse a forged or changed one."""
        for obj in session.new:
            mapper = inspect(obj).mapper
            if not self.is_tenant_mapper(mapper):
                continue
            attr = mapper.get_property_by_column(mapper.columns[self.tenant_column]).key
            value = getattr(obj, attr)
            if value is None:
                setattr(obj, attr, tenant_id)
            elif value != tenant_id:
                raise TenantContextError("a new row names another tenant")
        for obj in session.dirty:
            state = inspect(obj)
            if not self.is_tenant_mapper(state.mapper):
                continue
            attr = state.mapper.get_property_by_column(state.mapper.columns[self.tenant_column]).key
            if state.attrs[attr].history.has_changes():
                raise TenantContextError("the tenant of a row cannot be changed")


@event.listens_for(TenantBoundSession, "do_orm_execute")
def _scope_statement(state: ORMExecuteState) -> None:
    criteria: TenantCriteria | None = state.session.info.get(CRITERIA_KEY)
    if criteria is not None:
        criteria.apply(state, state.session.info[TENANT_KEY])


@event.listens_for(TenantBoundSession, "before_flush")
def _stamp_rows(session: Session, flush_context: UOWTransaction, instances: Any) -> None:
    criteria: TenantCriteria | None = session.info.get(CRITERIA_KEY)
    if criteria is not None:
        criteria.stamp(session, session.info[TENANT_KEY])
