"""Expressions of a guarded query: every name resolved, every call, operator and type checked.

``Expressions`` is the half of the walk that never opens a query level itself (``query`` is the
FROM-and-target half, ``_analyze.Walker``): column references resolved against the namespace,
field selection only on a known row, functions, operators and types from the allow-lists,
each unqualified function or type prefixed with ``pg_catalog.``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from . import _reasons as r
from ._allowlist import OPERATORS, SQL_VALUE_FUNCTIONS, TYPES
from ._lexer import identifier
from ._model import (
    COLUMN,
    IDENT_CONT,
    LEAVES,
    PASSTHROUGH,
    REFUSED,
    Analysis,
    Cols,
    Edit,
    Item,
    Level,
    Node,
    TableRule,
    name_list,
    only,
    refuse,
    unknown_column,
)

__all__ = ["Expressions"]


class Expressions:
    def __init__(
        self,
        b: bytes,
        rules: Mapping[str, TableRule],
        schema: str | None,
        functions: frozenset[str],
        max_depth: int,
        allow_recursive: bool,
        placeholder: str,
        barrier: bool,
    ) -> None:
        self.barrier = barrier
        self.b = b
        self.rules = rules
        self.schema = schema
        self.functions = functions
        self.max_depth = max_depth
        self.allow_recursive = allow_recursive
        self.placeholder = placeholder
        self.result = Analysis()
        self.relations = 0

    def query(self, body: Node, parent: Level | None, depth: int) -> Cols:
        raise NotImplementedError  # the walker's: a subquery opens a query level

    # -- name resolution -----------------------------------------------------------------------

    def _bare(self, name: str, level: Level) -> object:
        """``COLUMN`` when ``name`` is (or may be) a column; its relation when a whole row."""
        current: Level | None = level
        while current is not None:
            uncertain = False
            for entry in current.items:
                if not entry.cols_visible or (entry.lateral_only and not current.lateral_active):
                    continue
                if name in entry.colset:
                    return COLUMN
                if not entry.cols.complete:
                    uncertain = True
            if uncertain:
                return COLUMN  # PostgreSQL may find the column in a relation we cannot list
            current = current.parent
        return self._find_relation(name, level)

    def _find_relation(self, name: str, level: Level) -> Item | None:
        current: Level | None = level
        while current is not None:
            found = None
            for entry in current.items:
                if not entry.rel_visible or entry.refname != name:
                    continue
                if entry.lateral_only and not current.lateral_active:
                    continue
                if found is not None:
                    raise unknown_column(f"table reference {name!r} is ambiguous")
                found = entry
            if found is not None:
                return found
            current = current.parent
        return None

    def _relation(self, name: str, level: Level) -> Item:
        found = self._find_relation(name, level)
        if found is None:
            raise unknown_column(f"no table or alias {name!r} in scope")
        return found

    def _column_ref(self, body: Node, level: Level) -> Item | None:
        """Check a column reference; the relation when it is a whole-row reference."""
        fields = body["fields"]
        first = fields[0]
        if len(fields) == 1:
            if "String" not in first:
                raise refuse(r.UNSUPPORTED_SYNTAX, "'*' is allowed only in the select list")
            name = first["String"]["sval"]
            found = self._bare(name, level)
            if found is None:
                raise unknown_column(f"column {name!r} does not exist in scope")
            return found if found is not COLUMN else None  # type: ignore[return-value]
        if len(fields) == 2 and "String" in first:
            qualifier = first["String"]["sval"]
            entry = self._relation(qualifier, level)
            second = fields[1]
            if "String" not in second:
                return None  # alias.*
            column = second["String"]["sval"]
            if column not in entry.colset:
                raise unknown_column(
                    f"{column!r} is not a known column of {qualifier!r}"
                    + ("" if entry.cols.complete else " (its columns are not declared)")
                )
            return None
        raise refuse(
            r.UNSUPPORTED_SYNTAX, "qualify columns with a table name or alias only (alias.column)"
        )

    def _whole_row(self, node: object, level: Level, depth: int) -> Item:
        kind, body = only(node)
        if kind == "ColumnRef":
            fields = body.get("fields") or []
            if len(fields) == 1 and "String" in fields[0]:
                found = self._bare(fields[0]["String"]["sval"], level)
                if isinstance(found, Item) and found.cols.complete:
                    return found
        raise unknown_column(
            "field selection (x).f is allowed only on a table or alias whose columns are known"
        )

    # -- expressions ---------------------------------------------------------------------------

    def expr(self, node: object, level: Level, depth: int) -> None:
        if type(node) is list:
            for item in node:
                self.expr(item, level, depth)
            return
        if type(node) is not dict:
            return
        if len(node) != 1:
            raise refuse(r.UNSUPPORTED_SYNTAX, "unexpected query structure")
        for kind, body in node.items():
            if kind == "ColumnRef":
                self._column_ref(body, level)
            elif kind == "A_Const":
                value = body.get("sval")
                if value is not None:
                    self.result.literals.append((body["location"], value["sval"]))
            elif kind in LEAVES:
                pass
            elif type(body) is not dict:
                raise refuse(r.UNSUPPORTED_SYNTAX, "unexpected query structure")
            elif kind in _EXPRESSIONS:
                _EXPRESSIONS[kind](self, body, level, depth)
            elif kind in PASSTHROUGH:
                for child in body.values():
                    if type(child) is dict or type(child) is list:
                        self.expr(child, level, depth)
            elif kind in REFUSED:
                reason, message = REFUSED[kind]
                raise refuse(reason, message)
            else:
                raise refuse(r.UNSUPPORTED_SYNTAX, f"{kind} is not supported in a guarded query")

    def _e_column_ref(self, body: Node, level: Level, depth: int) -> None:
        self._column_ref(body, level)

    def _e_indirection(self, body: Node, level: Level, depth: int) -> None:
        indirection = body.get("indirection") or []
        arg = body.get("arg")
        if indirection and "A_Indices" not in indirection[0]:
            entry = self._whole_row(arg, level, depth)
            first = indirection[0]
            if "String" in first:
                if first["String"]["sval"] not in entry.colset:
                    raise unknown_column(
                        f"{first['String']['sval']!r} is not a known column of {entry.refname!r}"
                    )
            elif "A_Star" not in first:
                raise refuse(r.UNSUPPORTED_SYNTAX, "unexpected field selection")
            rest = indirection[1:]
        else:
            self.expr(arg, level, depth)
            rest = indirection
        for element in rest:
            kind, item = only(element)
            if kind != "A_Indices":
                raise unknown_column("field selection is allowed only on a table's row")
            for key in ("lidx", "uidx"):
                if item.get(key):
                    self.expr(item[key], level, depth)

    def _function_name(self, body: Node) -> str:
        names = name_list(body.get("funcname"))
        if not names:
            raise refuse(r.UNSUPPORTED_SYNTAX, "unexpected function call")
        if len(names) > 2 or (len(names) == 2 and names[0] != "pg_catalog"):
            raise refuse(r.SCHEMA_NOT_ALLOWED, f"function {'.'.join(names)!r}: schema not allowed")
        return names[-1]

    def _qualify(self, location: object, name: str) -> None:
        """Prefix an unqualified function or type name with ``pg_catalog.``."""
        if not isinstance(location, int) or location < 0:
            raise refuse(r.UNSUPPORTED_SYNTAX, f"{name!r} could not be located in the query")
        b = self.b
        plain = name.encode()
        end = location + len(plain)
        fast = b.startswith(plain, location) and (end == len(b) or b[end] not in IDENT_CONT)
        if not fast:  # quoted, Unicode-escaped or upper-case: read it as the lexer does
            _, read = identifier(b, location)
            if read is not None and read != plain[:63]:
                raise refuse(r.UNSUPPORTED_SYNTAX, f"{name!r} could not be located in the query")
        self.result.edits.append(Edit(location, location, "pg_catalog."))

    def _func_call(self, body: Node, level: Level, depth: int, *, qualify: bool = True) -> None:
        name = self._function_name(body)
        if name not in self.functions:
            raise refuse(
                r.FORBIDDEN_FUNCTION,
                f"function {name!r} is not allowed",
                hint="use aggregates, arithmetic, string, JSON, full-text, date/time and "
                "conditional functions",
            )
        if len(body["funcname"]) == 1 and qualify:
            self._qualify(body.get("location"), name)
        for key in ("args", "agg_order", "agg_filter"):
            child = body.get(key)
            if child:
                self.expr(child, level, depth)
        over = body.get("over")
        if over:
            self._e_window(over.get("WindowDef", over), level, depth)

    def _e_func_call(self, body: Node, level: Level, depth: int) -> None:
        self._func_call(body, level, depth)

    def _e_window(self, body: Node, level: Level, depth: int) -> None:
        for key in ("partitionClause", "orderClause", "startOffset", "endOffset"):
            child = body.get(key)
            if child:
                self.expr(child, level, depth)

    def _e_sort_by(self, body: Node, level: Level, depth: int) -> None:
        self._operator(name_list(body.get("useOp")))
        self.expr(body.get("node"), level, depth)

    def _operator_node(self, items: list[Node] | None) -> None:
        if items and len(items) == 1:
            symbol = items[0]["String"]["sval"]
            if symbol not in OPERATORS:
                raise refuse(r.FORBIDDEN_OPERATOR, f"operator {symbol!r} is not allowed")
            return
        self._operator(name_list(items))

    def _operator(self, names: list[str]) -> None:
        if not names:
            return
        if len(names) > 2 or (len(names) == 2 and names[0] != "pg_catalog"):
            raise refuse(r.SCHEMA_NOT_ALLOWED, f"operator {'.'.join(names)!r}: schema not allowed")
        if names[-1] not in OPERATORS:
            raise refuse(r.FORBIDDEN_OPERATOR, f"operator {names[-1]!r} is not allowed")

    def _e_a_expr(self, body: Node, level: Level, depth: int) -> None:
        # left-deep chains (a || b || c ...) are walked in a loop, not by recursion
        while True:
            if "BETWEEN" not in body["kind"]:
                self._operator_node(body.get("name"))
            if body.get("rexpr") is not None:
                self.expr(body["rexpr"], level, depth)
            left = body.get("lexpr")
            if type(left) is dict and len(left) == 1 and "A_Expr" in left:
                body = left["A_Expr"]
                continue
            if left is not None:
                self.expr(left, level, depth)
            return

    def _e_sublink(self, body: Node, level: Level, depth: int) -> None:
        self._operator(name_list(body.get("operName")))
        if body.get("testexpr"):
            self.expr(body["testexpr"], level, depth)
        _, select = only(body.get("subselect"))
        self.query(select, level, depth + 1)

    def _e_collate(self, body: Node, level: Level, depth: int) -> None:
        names = name_list(body.get("collname"))
        if len(names) > 2 or (len(names) == 2 and names[0] != "pg_catalog"):
            raise refuse(r.SCHEMA_NOT_ALLOWED, "collation: schema not allowed")
        self.expr(body.get("arg"), level, depth)

    def _e_sql_value(self, body: Node, level: Level, depth: int) -> None:
        if body.get("op") not in SQL_VALUE_FUNCTIONS:
            name = str(body.get("op")).removeprefix("SVFOP_").lower()
            raise refuse(r.FORBIDDEN_FUNCTION, f"{name} is not allowed")

    def _e_type_cast(self, body: Node, level: Level, depth: int) -> None:
        self.expr(body.get("arg"), level, depth)
        self._type_name(body.get("typeName"))

    def _e_const(self, body: Node, level: Level, depth: int) -> None:
        value = body.get("sval")
        if value is not None:
            location = body.get("location")
            if isinstance(location, int) and location >= 0:
                self.result.literals.append((location, value["sval"]))

    def _type_name(self, body: object) -> None:
        if not isinstance(body, dict):
            raise refuse(r.UNSUPPORTED_SYNTAX, "unexpected type name")
        names = name_list(body.get("names"))
        if not names or len(names) > 2 or (len(names) == 2 and names[0] != "pg_catalog"):
            raise refuse(r.SCHEMA_NOT_ALLOWED, "type: schema not allowed")
        if body.get("pct_type") or body.get("setof"):
            raise refuse(r.UNSUPPORTED_SYNTAX, "%TYPE and SETOF are not supported")
        if names[-1] not in TYPES:
            raise refuse(
                r.FORBIDDEN_TYPE,
                f"type {names[-1]!r} is not allowed",
                hint="cast to text, numeric, integer, date, timestamp, interval, json(b), ...",
            )
        for mod in body.get("typmods") or ():
            kind, _ = only(mod)
            if kind != "A_Const":
                raise refuse(r.UNSUPPORTED_SYNTAX, "type modifiers must be constants")
        if len(names) == 1:
            self._qualify(body.get("location"), names[0])


_EXPRESSIONS: dict[str, Callable[[Expressions, Node, Level, int], None]] = {
    "ColumnRef": Expressions._e_column_ref,
    "A_Indirection": Expressions._e_indirection,
    "FuncCall": Expressions._e_func_call,
    "WindowDef": Expressions._e_window,
    "SortBy": Expressions._e_sort_by,
    "A_Expr": Expressions._e_a_expr,
    "SubLink": Expressions._e_sublink,
    "CollateClause": Expressions._e_collate,
    "SQLValueFunction": Expressions._e_sql_value,
    "TypeCast": Expressions._e_type_cast,
    "A_Const": Expressions._e_const,
}
