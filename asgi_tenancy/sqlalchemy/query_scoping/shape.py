"""What a statement touches, found by walking it once: tables, mapped entities, fragments.

QueryScoping refuses what its criteria cannot confine; this module only describes. Walks are
cached by SQLAlchemy's statement cache key (bounded: ``SHAPE_CACHE_SIZE`` shapes of about
4.6 KB each, the key included, so about 4.5 MB when full; cleared when full, never expired, as
a key's shape cannot change).
"""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Mapper
from sqlalchemy.sql import visitors
from sqlalchemy.sql.dml import UpdateBase
from sqlalchemy.sql.elements import ColumnClause, TextClause, quoted_name
from sqlalchemy.sql.lambdas import LambdaElement
from sqlalchemy.sql.operators import custom_op
from sqlalchemy.sql.selectable import Alias, Select, TableClause

__all__ = ["SHAPE_CACHE_SIZE", "Shape", "cached_shape", "resolved", "shape_of"]


class Shape:
    """What a statement touches, found by walking it once."""

    __slots__ = (
        "beside",
        "entities",
        "fragment",
        "mappers",
        "nested_dml",
        "raw_tables",
        "tables",
        "target",
    )

    def __init__(self) -> None:
        self.tables: set[str] = set()
        self.raw_tables: set[str] = set()  # tables read without an ORM entity to filter them
        self.mappers: set[Mapper[Any]] = set()
        self.fragment = False  # SQL the library cannot read: text, literal names, hints
        # An INSERT, UPDATE or DELETE: the table it writes, and every table it names besides
        # that one table at its top level (subqueries, CTEs, aliases, UPDATE ... FROM).
        self.target: str | None = None
        self.beside: set[str] = set()
        self.nested_dml: set[str] = set()  # tables written by DML inside the statement (CTEs)
        # The statement's own entities (ORMExecuteState.all_mappers), filled on first use: a
        # cache key fixes them as it fixes the rest.
        self.entities: tuple[Mapper[Any], ...] | None = None


# Custom operators (``column.op("...")``) render their string as SQL; only symbols are read as
# an operator, a word such as OR could reorder the statement around the tenant predicate.
_SAFE_OPERATOR = re.compile(r"[!#%&*+\-/<=>?@^~:]+\Z")


def _is_fragment(element: object) -> bool:
    if isinstance(element, TextClause):
        return True
    name = getattr(element, "name", None)
    if isinstance(name, quoted_name) and name.quote is False:
        return True  # rendered verbatim, unquoted
    if isinstance(element, ColumnClause) and element.is_literal:
        # count(*), and the constant of EXISTS (SELECT 1 ...) that any() and has() write
        return element.name != "*" and not element.name.isdigit()
    for pasted in ("_hints", "_statement_hints", "_prefixes", "_suffixes"):
        if getattr(element, pasted, None):
            return True  # hints, prefixes and suffixes are pasted into the SQL as they are
    operator = getattr(element, "operator", None)
    return isinstance(operator, custom_op) and not _SAFE_OPERATOR.match(operator.opstring)


def _hidden_criteria(element: Any) -> list[Any]:
    """Criteria the walk does not reach: loader options and ``relationship.and_()`` joins."""
    found: list[Any] = []
    for option in getattr(element, "_with_options", ()):
        criteria: Any = getattr(option, "where_criteria", None)
        if getattr(option, "deferred_where_criteria", False):
            entity = option.root_entity or getattr(option.entity, "class_", None)
            try:
                criteria = criteria._resolve_with_args(entity)
            except Exception:  # an unreadable lambda is refused, not trusted
                criteria = text("")
        if criteria is not None:
            found.append(criteria)
        for load in getattr(option, "context", ()):
            found.extend(getattr(load, "_extra_criteria", ()))
    for join in getattr(element, "_setup_joins", ()):
        found.extend(getattr(join[0], "_extra_criteria", ()))
    return found


SHAPE_CACHE_SIZE = 1_000  # distinct statement shapes; cleared when full (about 4.5 MB)
_shapes: dict[Any, Shape] = {}


def cached_shape(statement: object) -> Shape:
    """``_shape`` once per statement shape, keyed like SQLAlchemy's compiled cache.

    Two statements with one cache key compile to the same SQL text, so they touch the same
    tables and fragments; the key is memoized on the statement, where compilation reuses it.
    Statements SQLAlchemy cannot key (``None``) are walked every time.
    """
    generate = getattr(statement, "_generate_cache_key", None)
    cache_key = generate() if generate is not None else None
    if cache_key is None:
        return shape_of(statement)
    shape = _shapes.get(cache_key.key)
    if shape is None:
        if len(_shapes) >= SHAPE_CACHE_SIZE:
            _shapes.clear()
        shape = _shapes[cache_key.key] = shape_of(statement)
    return shape


def resolved(statement: Any) -> Any:
    """The statement a ``lambda_stmt()`` stands for (with this call's values); others as given."""
    return statement._resolved if isinstance(statement, LambdaElement) else statement


def shape_of(statement: object) -> Shape:
    shape = Shape()
    statement = resolved(statement)
    if isinstance(statement, UpdateBase):
        table = statement.table
        if isinstance(table, TableClause) and not isinstance(table, Alias):
            shape.target = table.fullname
    if isinstance(statement, visitors.ExternallyTraversible):
        _walk_select(statement, shape, nested=False)
    else:
        shape.fragment = True
    return shape


def _walk_select(root: Any, shape: Shape, *, nested: bool) -> None:
    """Walk one SELECT (or DML statement); each nested SELECT is a scope of its own."""
    # Raw (non-ORM) references to tables, by how many times each is met; the table inside an
    # ORM alias (aliased(Model)) is met once for that alias, and the alias carries criteria.
    raw: dict[TableClause, int] = {}
    raw_columns: set[TableClause] = set()
    in_orm_alias: dict[TableClause, int] = {}
    entities: set[TableClause] = set()  # tables this SELECT selects as plain ORM entities
    # Aliases met without ORM annotations (a FROM list SQLAlchemy derived from columns) are
    # aliased() entities when an ORM-annotated reference names the same alias object.
    bare_aliases: dict[int, TableClause] = {}
    orm_aliases: set[int] = set()
    todo: list[Any] = [root]
    while todo:
        element = todo.pop()
        if element is not root and isinstance(element, (Select, UpdateBase)):
            if isinstance(element, UpdateBase) and isinstance(element.table, TableClause):
                shape.nested_dml.add(element.table.fullname)
            _walk_select(element, shape, nested=True)
            continue
        annotations = getattr(element, "_annotations", None) or {}
        mapper = annotations.get("parentmapper")
        if mapper is not None:
            shape.mappers.add(mapper)
        if _is_fragment(element):
            shape.fragment = True
        if isinstance(element, TableClause):
            shape.tables.add(element.fullname)
            if nested or element.fullname != shape.target:
                shape.beside.add(element.fullname)
            if mapper is None:
                raw[element] = raw.get(element, 0) + 1
            else:
                entities.update(mapper.tables)
        elif isinstance(element, ColumnClause) and isinstance(element.table, TableClause):
            shape.tables.add(element.table.fullname)
            if nested or element.table.fullname != shape.target:
                shape.beside.add(element.table.fullname)
            if mapper is None:
                raw_columns.add(element.table)
            else:
                entities.add(element.table)
        elif isinstance(element, ColumnClause) and isinstance(element.table, Alias):
            aliased = element.table.element  # a column of an alias met outside any FROM list
            if isinstance(aliased, TableClause):
                shape.tables.add(aliased.fullname)
                shape.beside.add(aliased.fullname)
            if getattr(annotations.get("parententity"), "is_aliased_class", False):
                orm_aliases.add(id(element.table._deannotate()))
        elif isinstance(element, Alias) and isinstance(element.element, TableClause):
            inner = element.element
            shape.tables.add(inner.fullname)
            shape.beside.add(inner.fullname)
            if mapper is None:  # a Core alias, unless an aliased() entity is this alias
                bare_aliases[id(element._deannotate())] = inner
            else:
                orm_aliases.add(id(element._deannotate()))
                in_orm_alias[inner] = in_orm_alias.get(inner, 0) + 1
        todo.extend(_hidden_criteria(element))
        todo.extend(element.get_children())
    for key, inner in bare_aliases.items():
        if key in orm_aliases:
            in_orm_alias[inner] = in_orm_alias.get(inner, 0) + 1
        else:  # no criteria can follow a Core alias
            shape.raw_tables.add(inner.fullname)
    # A raw reference to the very table this SELECT also selects as an (unaliased) ORM entity
    # shares that entity's FROM, so the entity's criteria cover it: SQLAlchemy's own get() and
    # lazy loads are written that way. Any other raw reference would be read unfiltered.
    shape.raw_tables.update(table.fullname for table in raw_columns - entities)
    shape.raw_tables.update(
        table.fullname
        for table, count in raw.items()
        if table not in entities and count > in_orm_alias.get(table, 0)
    )
