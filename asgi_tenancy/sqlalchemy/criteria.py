"""The explicit tenant predicate on ORM statements, and tenant stamping of new rows.

QueryScoping relies on it alone; RowLevelSecurity adds it on top of the database policy so
indexes (and distributed engines such as Citus) see the tenant in every query.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

from sqlalchemy import inspect
from sqlalchemy.exc import InvalidRequestError
from sqlalchemy.orm import Mapper, ORMExecuteState, Session, with_loader_criteria
from sqlalchemy.sql.elements import BindParameter, ClauseElement
from sqlalchemy.sql.selectable import FromClause, SelectBase

from ..errors import TenantContextError

__all__ = ["TenantCriteria"]


def _by_class_name(mapper: Mapper[Any]) -> str:
    return mapper.class_.__qualname__


class TenantCriteria:
    """Which mapped classes carry the tenant column, and how they are filtered and stamped."""

    # Inserts whose rows the ORM cannot check (upserts that update, INSERT ... SELECT, VALUES
    # rows without the tenant) are refused when no database policy checks them instead.
    refuse_unchecked: ClassVar[bool] = False

    #: Loader-criteria options kept per (tenant, mapper): at most this many, oldest out.
    max_cached_options: ClassVar[int] = 10_000

    def __init__(self, tenant_column: str = "tenant_id") -> None:
        self.tenant_column = tenant_column
        self._reach: dict[Mapper[Any], tuple[Mapper[Any], ...]] = {}
        self._options: dict[tuple[str, Mapper[Any]], Any] = {}

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
            self._reach[mapper] = found
        return found

    def _attr(self, mapper: Mapper[Any]) -> str:
        return mapper.get_property_by_column(mapper.columns[self.tenant_column]).key

    def apply(
        self,
        state: ORMExecuteState,
        tenant_id: str,
        extra: Iterable[Mapper[Any]] = (),
        *,
        beside: bool = False,
        entities: Iterable[Mapper[Any]] | None = None,
    ) -> None:
        """Add the tenant predicate to ORM reads, updates and deletes; check ORM insert values.

        ``extra``: more mappers the statement names (an INSERT gets criteria for these only);
        ``beside``: an UPDATE or DELETE may name entities besides its target at its top level;
        ``entities``: ``state.all_mappers`` when the caller has it already (it is read from
        the statement's entities, which costs about as much as the rest of this call).
        """
        if state.is_insert:
            self._check_insert(state, tenant_id)
            self._add_criteria(state, tenant_id, extra)
            return
        if not (state.is_select or state.is_update or state.is_delete):
            return
        if state.is_update:
            self._check_update(state, tenant_id)
        top = state.all_mappers if entities is None else entities
        self._add_criteria(state, tenant_id, (*top, *extra))
        if beside and not state.is_select:
            state.statement = self._scope_beside_target(state.statement, tenant_id)

    def _add_criteria(
        self, state: ORMExecuteState, tenant_id: str, found: Iterable[Mapper[Any]]
    ) -> None:
        mappers: set[Mapper[Any]] = set()
        for mapper in found:
            mappers.update(self._reachable(mapper))
        if not mappers:
            return
        # One order, so one cache key for the statement.
        options = [self._option(tenant_id, m) for m in sorted(mappers, key=_by_class_name)]
        state.statement = state.statement.options(*options)

    def _option(self, tenant_id: str, mapper: Mapper[Any]) -> Any:
        """The loader criteria for ``mapper`` under ``tenant_id``; options are immutable, so
        one built per (tenant, mapper) serves every statement (bounded, oldest out)."""
        key = (tenant_id, mapper)
        option = self._options.get(key)
        if option is None:
            # The tenant is a plain value: a bound parameter of the cached statement.
            option = with_loader_criteria(
                mapper.class_,
                # The mapped attribute, not the Column: its ORM annotations let SQLAlchemy adapt
                # the predicate to aliases (joined eager loads, aliased()).
                getattr(mapper.class_, self._attr(mapper)) == tenant_id,
                include_aliases=True,
            )
            if len(self._options) >= self.max_cached_options:
                del self._options[next(iter(self._options))]
            self._options[key] = option
        return option

    def _scope_beside_target(self, statement: Any, tenant_id: str) -> Any:
        """AND the tenant predicate for every entity an UPDATE ... FROM or DELETE ... USING names
        besides its target: loader criteria reach only the target and nested SELECTs."""
        target = statement.table.fullname
        entities: dict[int, Any] = {}
        todo = list(statement.get_children())
        while todo:
            element = todo.pop()
            if isinstance(element, (SelectBase, FromClause)):
                continue  # nested SELECTs carry loader criteria; FROM lists are not entities
            entity = element._annotations.get("parententity")
            if (
                entity is not None
                and self.is_tenant_mapper(entity.mapper)
                and (entity.is_aliased_class or target not in {t.fullname for t in entity.tables})
            ):
                entities[id(entity)] = entity
            todo.extend(element.get_children())
        for entity in entities.values():
            attribute = getattr(entity.entity, self._attr(entity.mapper))
            statement = statement.where(attribute == tenant_id)
        return statement

    def _tenant_keys(self, mapper: Mapper[Any]) -> set[object]:
        column = mapper.columns[self.tenant_column]
        return {self._attr(mapper), column.key, column.name, column}

    def _is_tenant_key(self, key: object, keys: set[object]) -> bool:
        if isinstance(key, str):
            return key in keys
        if key in keys:
            return True
        return getattr(key, "key", None) in keys and getattr(key, "class_", None) is not None

    def _check_insert(self, state: ORMExecuteState, tenant_id: str) -> None:
        mapper = state.bind_mapper
        if mapper is None or not self.is_tenant_mapper(mapper):
            return
        statement: Any = state.statement
        keys = self._tenant_keys(mapper)
        if self.refuse_unchecked:
            self._refuse_unchecked(statement, keys)
        for row in getattr(statement, "_multi_values", ()):
            for values in row:
                if isinstance(values, Mapping):
                    self._check_values(values, keys, tenant_id)
        values = getattr(statement, "_values", None) or {}
        stamped_by_values = any(self._is_tenant_key(k, keys) for k in values)
        self._check_values(values, keys, tenant_id)
        attr = self._attr(mapper)
        params: Any = state.parameters
        if isinstance(params, list):
            state.parameters = [self._stamp_params(p, attr, keys, tenant_id) for p in params]
        elif params:
            state.parameters = self._stamp_params(params, attr, keys, tenant_id)
        elif not stamped_by_values and not statement._multi_values and statement.select is None:
            state.statement = statement.values({attr: tenant_id})

    def _refuse_unchecked(self, statement: Any, keys: set[object]) -> None:
        upsert = getattr(statement, "_post_values_clause", None)
        if upsert is not None and type(upsert).__name__ != "OnConflictDoNothing":
            # ON CONFLICT DO UPDATE / ON DUPLICATE KEY UPDATE: the row it updates is found by a
            # unique key, not by the tenant, and its SET clause is not checked.
            raise TenantContextError("an upsert that updates is refused on a tenant table")
        if getattr(statement, "select", None) is not None:
            raise TenantContextError(
                "INSERT ... SELECT into a tenant table is refused: its rows cannot be checked"
            )
        for row in getattr(statement, "_multi_values", ()):
            for values in row:
                if not isinstance(values, Mapping) or not any(
                    self._is_tenant_key(k, keys) for k in values
                ):
                    raise TenantContextError(
                        "multi-row VALUES into a tenant table must name the tenant",
                        hint="pass the rows as parameters: session.execute(insert(M), rows)",
                    )

    def _stamp_params(
        self, row: Mapping[str, Any], attr: str, keys: set[object], tenant_id: str
    ) -> dict[str, Any]:
        stamped = dict(row)
        for key in [k for k in stamped if k in keys]:
            if stamped[key] != tenant_id:
                raise TenantContextError("a new row names another tenant")
        stamped.setdefault(attr, tenant_id)
        return stamped

    def _check_values(self, values: Mapping[Any, Any], keys: set[object], tenant_id: str) -> None:
        for key, value in values.items():
            if not self._is_tenant_key(key, keys):
                continue
            literal = getattr(value, "value", value) if isinstance(value, BindParameter) else value
            if isinstance(value, BindParameter) and value.callable is not None:
                literal = None
            if isinstance(literal, ClauseElement) or literal != tenant_id:
                raise TenantContextError("a new row names another tenant")

    def _check_update(self, state: ORMExecuteState, tenant_id: str) -> None:
        mapper = state.bind_mapper
        if mapper is None or not self.is_tenant_mapper(mapper):
            return
        keys = self._tenant_keys(mapper)
        statement: Any = state.statement
        values = getattr(statement, "_values", None) or {}
        if any(self._is_tenant_key(k, keys) for k in values):
            raise TenantContextError("the tenant of a row cannot be changed")
        params: Any = state.parameters
        rows = params if isinstance(params, list) else [params] if params else []
        for row in rows:
            for key in row:
                if key in keys and row[key] != tenant_id:
                    raise TenantContextError("the tenant of a row cannot be changed")

    def stamp(self, session: Session, tenant_id: str) -> None:
        """Fill the tenant column of new objects; refuse a forged or changed one.

        Changed and deleted objects must belong to the tenant too: an object loaded by another
        tenant's session and added to this one would otherwise be written by primary key.
        """
        for obj in session.new:
            mapper = inspect(obj).mapper
            if not self.is_tenant_mapper(mapper):
                continue
            attr = self._attr(mapper)
            value = getattr(obj, attr)
            if value is None:
                setattr(obj, attr, tenant_id)
            elif value != tenant_id:
                raise TenantContextError("a new row names another tenant")
        for obj in (*session.dirty, *session.deleted):
            state = inspect(obj)
            if not self.is_tenant_mapper(state.mapper):
                continue
            attr = self._attr(state.mapper)
            history = state.attrs[attr].history
            if history.has_changes():
                raise TenantContextError("the tenant of a row cannot be changed")
            if attr not in state.dict:
                try:
                    session.refresh(obj, [attr])  # scoped: another tenant's row is not found
                except InvalidRequestError:
                    raise TenantContextError("this row belongs to another tenant") from None
            if state.dict.get(attr) != tenant_id:
                raise TenantContextError("this row belongs to another tenant")
