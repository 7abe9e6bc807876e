"""Walk PostgreSQL's raw parse tree resolving every name as the server will, collect the edits.

Fail-closed by construction: a node type that is not listed here refuses the query. Names are
resolved with PostgreSQL's rules (``parse_relation.c``): one namespace per query level, FROM
items visible to later items only under LATERAL (functions in FROM are implicitly LATERAL), a
JOIN's ON clause sees only the join's own inputs, an aliased join hides its inputs, an
unaliased one shows them by name but not their columns, a bare name is a column before it is a
relation's whole row, the nearest query level wins. Every relation's columns are tracked
(declared tables, CTEs, subqueries, joins with USING/NATURAL, set operations, VALUES,
functions), so ``x.f`` and ``(x).f`` (which PostgreSQL reads as the call ``f(x)`` when ``f``
is not a column) are accepted only when ``f`` is a known column of ``x``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from . import _reasons as r
from ._allowlist import SET_RETURNING
from ._expressions import Expressions
from ._lexer import name_span
from ._model import (
    MAX_RELATIONS,
    NAME_FOLLOWS,
    NAME_RISKY,
    REFUSED,
    UNKNOWN,
    WRITES,
    Analysis,
    Cols,
    Edit,
    Item,
    Level,
    Node,
    TableRule,
    alias_of,
    branch,
    figure_colname,
    is_table_form,
    name_list,
    only,
    quote,
    refuse,
    unknown_column,
    wrapper,
)

__all__ = ["Analysis", "Cols", "Edit", "TableRule", "analyze"]


class _Walker(Expressions):
    """The query half of the walk: levels, WITH, FROM, targets, ORDER BY."""

    # -- query levels --------------------------------------------------------------------------

    def query(self, body: Node, parent: Level | None, depth: int) -> Cols:
        """Analyse one SelectStmt (a new query level under ``parent``); its output columns."""
        if depth > self.max_depth:
            raise refuse(
                r.TOO_COMPLEX,
                f"query nests deeper than {self.max_depth} levels",
                hint="flatten nested subqueries into CTEs",
            )
        if body.get("intoClause"):
            raise refuse(r.NOT_A_SELECT, "SELECT INTO creates a table; it is not allowed")
        if body.get("lockingClause"):
            raise refuse(r.LOCKING_CLAUSE, "FOR UPDATE / FOR SHARE is not allowed")
        level = Level(parent)
        if body.get("withClause"):
            self._with(body["withClause"], level, depth)
        op = body.get("op", "SETOP_NONE")
        if op != "SETOP_NONE":
            left = self.query(branch(body.get("larg")), level, depth + 1)
            self.query(branch(body.get("rarg")), level, depth + 1)
            # ORDER BY / LIMIT of a set operation see its output columns only
            level.items = [Item(None, left)]
            self._tail(body, level, depth, left.names)
            return left
        if body.get("valuesLists"):
            width = 0
            for row in body["valuesLists"]:
                _, items = only(row)
                values = items.get("items") or []
                width = len(values)
                for value in values:
                    self.expr(value, level, depth)
            output = Cols(tuple(f"column{i}" for i in range(1, width + 1)), True)
            self._tail(body, level, depth, output.names)
            return output
        table_form = is_table_form(body)
        for item in body.get("fromClause") or ():
            new = self.from_item(item, level, depth, table_form=table_form)
            for entry in new:
                entry.lateral_only = True
            level.items.extend(new)
        for entry in level.items:
            entry.lateral_only = False
        output = self._targets(body.get("targetList") or [], level, depth)
        if body.get("whereClause"):
            self.expr(body["whereClause"], level, depth)
        for item in body.get("groupClause") or ():
            self._ordering(item, level, depth, output.names, outputs_first=False)
        if body.get("havingClause"):
            self.expr(body["havingClause"], level, depth)
        for window in body.get("windowClause") or ():
            self.expr(window, level, depth)
        for item in body.get("distinctClause") or ():
            if item:
                self._ordering(item, level, depth, output.names, outputs_first=True)
        self._tail(body, level, depth, output.names)
        return output

    def _tail(self, body: Node, level: Level, depth: int, outputs: tuple[str, ...]) -> None:
        for item in body.get("sortClause") or ():
            self._ordering(item, level, depth, outputs, outputs_first=True)
        for key in ("limitCount", "limitOffset"):
            if body.get(key):
                self.expr(body[key], level, depth)

    def _ordering(
        self,
        node: Node,
        level: Level,
        depth: int,
        outputs: tuple[str, ...],
        *,
        outputs_first: bool,
    ) -> None:
        """ORDER BY, GROUP BY, DISTINCT ON: a bare name may also be an output column."""
        kind, body = only(node)
        if kind == "SortBy":
            self._operator(name_list(body.get("useOp")))
            node = body["node"]
            kind, body = only(node)
        if kind == "ColumnRef":
            fields = body.get("fields") or []
            if len(fields) == 1 and "String" in fields[0]:
                name = fields[0]["String"]["sval"]
                if name in outputs and (outputs_first or self._bare(name, level) is None):
                    return
        self.expr(node, level, depth)

    def _with(self, clause: Node, level: Level, depth: int) -> None:
        ctes: list[tuple[str, Node]] = []
        for item in clause.get("ctes") or ():
            kind, cte = only(item)
            name = cte.get("ctename")
            if kind != "CommonTableExpr" or not isinstance(name, str):
                raise refuse(r.UNSUPPORTED_SYNTAX, "unexpected WITH item")
            query_kind, _ = only(cte.get("ctequery"))
            if query_kind in WRITES:
                raise refuse(
                    r.DATA_MODIFYING_CTE, f"WITH {name} writes data; only SELECT is allowed"
                )
            if query_kind != "SelectStmt":
                raise refuse(r.NOT_A_SELECT, f"WITH {name} must be a SELECT")
            ctes.append((name, cte))
        recursive = bool(clause.get("recursive"))
        if recursive and not self.allow_recursive:
            raise refuse(
                r.TOO_COMPLEX,
                "WITH RECURSIVE is not allowed here",
                hint="compute the levels with joins or generate_series",
            )
        if recursive:
            for name, cte in ctes:  # all visible to all; columns known once analysed
                level.ctes[name] = Cols(tuple(name_list(cte.get("aliascolnames"))), False)
        for name, cte in ctes:
            aliases = name_list(cte.get("aliascolnames"))
            _, select = only(cte["ctequery"])
            if recursive and select.get("op") == "SETOP_UNION":
                # the non-recursive term fixes the columns the recursive term reads
                left = self.query(branch(select.get("larg")), level, depth + 1)
                level.ctes[name] = self._cte_columns(left.renamed(aliases), cte)
                self.query(branch(select.get("rarg")), level, depth + 1)
                for key in ("sortClause", "limitCount", "limitOffset", "withClause"):
                    if select.get(key):
                        raise refuse(r.UNSUPPORTED_SYNTAX, "unexpected recursive CTE shape")
                continue
            cols = self.query(select, level, depth + 1).renamed(aliases)
            if recursive:
                level.ctes[name] = self._cte_columns(cols, cte)
            else:
                level.ctes = {**level.ctes, name: self._cte_columns(cols, cte)}

    def _cte_columns(self, cols: Cols, cte: Node) -> Cols:
        extra: list[str] = []
        search = cte.get("search_clause")
        if search:
            extra.append(search["CTESearchClause"]["search_seq_column"])
        cycle = cte.get("cycle_clause")
        if cycle:
            body = cycle["CTECycleClause"]
            extra += [body["cycle_mark_column"], body["cycle_path_column"]]
            for key in ("cycle_mark_value", "cycle_mark_default"):
                if body.get(key):
                    self.expr(body[key], Level(None), 0)
        if not extra:
            return cols
        return Cols(cols.names + tuple(extra), cols.complete)

    def _cte(self, name: str, level: Level | None) -> Cols | None:
        while level is not None:
            if name in level.ctes:
                return level.ctes[name]
            level = level.parent
        return None

    # -- FROM ----------------------------------------------------------------------------------

    def _count_relation(self) -> None:
        self.relations += 1
        if self.relations > MAX_RELATIONS:
            raise refuse(
                r.TOO_COMPLEX,
                f"query reads more than {MAX_RELATIONS} relations",
                hint="split the question into smaller queries",
            )

    def from_item(
        self, node: object, level: Level, depth: int, *, table_form: bool = False
    ) -> list[Item]:
        """The namespace entries one FROM item adds (the last one carries its columns)."""
        kind, body = only(node)
        if kind == "RangeVar":
            self._count_relation()
            return [self._range_var(body, level, table_form=table_form)]
        if kind == "RangeSubselect":
            self._count_relation()
            lateral = bool(body.get("lateral"))
            saved, level.lateral_active = level.lateral_active, lateral
            try:
                _, select = only(body.get("subquery"))
                cols = self.query(select, level, depth + 1)
            finally:
                level.lateral_active = saved
            name, aliases = alias_of(body)
            return [Item(name, cols.renamed(aliases))]
        if kind == "RangeFunction":
            self._count_relation()
            return [self._range_function(body, level, depth)]
        if kind == "JoinExpr":
            return self._join(body, level, depth)
        if kind in REFUSED:
            reason, message = REFUSED[kind]
            raise refuse(reason, message)
        raise refuse(r.UNSUPPORTED_SYNTAX, f"{kind} is not supported in a guarded query")

    def _join(self, body: Node, level: Level, depth: int) -> list[Item]:
        left = self.from_item(body.get("larg"), level, depth)
        for entry in left:
            entry.lateral_only = True
        mark = len(level.items)
        level.items.extend(left)
        try:
            right = self.from_item(body.get("rarg"), level, depth)
        finally:
            del level.items[mark:]
        mine = left + right
        for entry in mine:
            entry.lateral_only = False
        l_cols, r_cols = left[-1].cols, right[-1].cols
        using = name_list(body.get("usingClause"))
        if body.get("isNatural"):
            if not (l_cols.complete and r_cols.complete):
                raise unknown_column("NATURAL JOIN needs the columns of both sides to be known")
            using = [c for c in l_cols.names if c in r_cols.names]
        if using:
            for side in (l_cols, r_cols):
                if side.complete and any(c not in side.names for c in using):
                    raise unknown_column("a USING column is not a column of both sides")
            if l_cols.complete and r_cols.complete:
                names = tuple(using) + tuple(
                    c for c in l_cols.names + r_cols.names if c not in using
                )
                cols = Cols(names, True)
            else:
                cols = Cols(tuple(dict.fromkeys(using + list(l_cols.names + r_cols.names))), False)
        else:
            cols = Cols(l_cols.names + r_cols.names, l_cols.complete and r_cols.complete)
        if body.get("quals"):
            saved = level.items
            level.items = mine  # the ON clause sees the join's own inputs only
            try:
                self.expr(body["quals"], level, depth)
            finally:
                level.items = saved
        name, aliases = alias_of(body)
        if name is not None:
            mine = []
        else:
            for entry in mine:
                entry.cols_visible = False
        mine.append(Item(name, cols.renamed(aliases)))
        using_alias = body.get("join_using_alias")
        if using_alias:
            extra = Item(using_alias.get("aliasname"), Cols(tuple(using), True))
            extra.cols_visible = False
            mine.append(extra)
        return mine

    def _range_var(self, body: Node, level: Level, *, table_form: bool) -> Item:
        relname = body.get("relname")
        schema = body.get("schemaname")
        if not isinstance(relname, str):
            raise refuse(r.UNSUPPORTED_SYNTAX, "unexpected table reference")
        if body.get("catalogname") is not None:
            raise refuse(r.SCHEMA_NOT_ALLOWED, "database-qualified names are not allowed")
        alias, aliases = alias_of(body)
        refname = alias if alias is not None else relname
        if schema is None:
            cte = self._cte(relname, level)
            if cte is not None:
                return Item(refname, cte.renamed(aliases))
        if schema is not None and schema != self.schema:
            raise refuse(
                r.SCHEMA_NOT_ALLOWED,
                f"schema {schema!r} is not allowed"
                + (f"; use {self.schema!r} or no schema" if self.schema else "; use no schema"),
            )
        rule = self.rules.get(relname)
        if rule is None:
            raise refuse(
                r.UNKNOWN_TABLE,
                f"table {relname!r} is not available",
                hint="available tables: " + ", ".join(sorted(self.rules)),
            )
        if rule.tenant_column is None and not rule.shared and schema is not None:
            # schema-per-tenant: only the session's search_path may resolve the name
            raise refuse(r.SCHEMA_NOT_ALLOWED, f"write {relname!r} without a schema")
        if body.get("inh") is not True:
            raise refuse(r.UNSUPPORTED_SYNTAX, "ONLY is not supported")
        self.result.tables.add(relname)
        cols = UNKNOWN if rule.columns is None else Cols(rule.columns, True)
        item = Item(refname, cols.renamed(aliases))
        replacement = self._table_text(rule)
        if replacement is None:
            return item
        location = body.get("location")
        if not isinstance(location, int) or location < 0:
            raise refuse(r.UNSUPPORTED_SYNTAX, "unexpected table reference")
        end = self._name_end(location, relname, schema)
        if table_form:
            text = f" SELECT * FROM {replacement} AS {quote(relname)} "
            self.result.table_forms.append(len(self.result.edits))
        elif alias is None:
            text = f" {replacement} AS {quote(relname)} "
        else:
            text = f" {replacement} "
        self.result.edits.append(Edit(location, end, text))
        return item

    def _name_end(self, location: int, relname: str, schema: str | None) -> int:
        """Where the table name at ``location`` ends (plain names without reading them)."""
        b = self.b
        if schema is None:
            plain = relname.encode()
            end = location + len(plain)
            if b.startswith(plain, location) and (end == len(b) or b[end] in NAME_FOLLOWS):
                after = end
                while after < len(b) and b[after] in b" \t\r\n":
                    after += 1
                if after == len(b) or b[after] not in NAME_RISKY:
                    return end
        return name_span(b, location, [relname] if schema is None else [schema, relname])

    def _table_text(self, rule: TableRule) -> str | None:
        """The text that replaces a reference to ``rule``'s table (None: left as written)."""
        if rule.tenant_column is not None:
            self.result.placeholders += 1
        return wrapper(rule, self.schema, self.placeholder, self.barrier)

    def _range_function(self, body: Node, level: Level, depth: int) -> Item:
        names: list[str] = []
        complete = True
        scalar = False
        functions: list[Any] = body.get("functions") or []
        saved, level.lateral_active = level.lateral_active, True  # implicitly LATERAL
        try:
            for group in functions:
                _, items = only(group)
                call, coldefs = ([*(items.get("items") or []), None, None])[:2]
                call_kind, call_body = only(call)
                if call_kind != "FuncCall":
                    raise refuse(r.FORBIDDEN_FUNCTION, "only functions may appear in FROM")
                name = self._function_name(call_body)
                if name not in SET_RETURNING or name not in self.functions:
                    raise refuse(
                        r.FORBIDDEN_FUNCTION,
                        f"function {name!r} is not allowed in FROM",
                        hint="allowed: " + ", ".join(sorted(SET_RETURNING)),
                    )
                # unnest(a, b) in FROM is PostgreSQL's own rewrite into ROWS FROM (unnest(a),
                # unnest(b)), made only for the unqualified name
                multi = name == "unnest" and len(call_body.get("args") or ()) > 1
                self._func_call(call_body, level, depth, qualify=not multi)
                if coldefs:
                    names += self._column_defs(coldefs)
                    continue
                shape = SET_RETURNING[name]
                if shape is None:
                    names.append(name)
                    scalar = True
                elif shape:
                    names += shape
                else:
                    complete = False
        finally:
            level.lateral_active = saved
        alias, aliases = alias_of(body)
        if body.get("coldeflist"):
            names = self._column_defs(body["coldeflist"])
            complete = True
        elif scalar and len(functions) == 1 and alias is not None:
            names = [alias]  # a scalar function's column takes the table alias
        if body.get("ordinality"):
            names.append("ordinality")
        cols = Cols(tuple(names), True) if complete else UNKNOWN
        refname = alias
        if refname is None and len(functions) == 1:
            _, group = only(functions[0])
            refname = self._function_name(only(group["items"][0])[1])
        return Item(refname, cols.renamed(aliases))

    def _column_defs(self, defs: object) -> list[str]:
        if isinstance(defs, dict):
            defs = (defs.get("List") or {}).get("items")
        names: list[str] = []
        for item in defs if isinstance(defs, list) else ():
            kind, body = only(item)
            if kind != "ColumnDef" or not isinstance(body.get("colname"), str):
                raise refuse(r.UNSUPPORTED_SYNTAX, "unexpected column definition")
            self._type_name(body.get("typeName"))
            names.append(body["colname"])
        if not names:
            raise refuse(r.UNSUPPORTED_SYNTAX, "unexpected column definition")
        return names

    # -- target list ---------------------------------------------------------------------------

    def _targets(self, targets: list[Node], level: Level, depth: int) -> Cols:
        names: list[str] = []
        complete = True
        for target in targets:
            rt = target["ResTarget"]
            val = rt["val"]
            kind, body = only(val)
            star = (
                self._star_columns(kind, body, level, depth)
                if kind == "ColumnRef" or kind == "A_Indirection"
                else None
            )
            if star is not None:
                names += star.names
                complete = complete and star.complete
                continue
            self.expr(val, level, depth)
            names.append(rt["name"] if rt.get("name") else figure_colname(val)[0])
        return Cols(tuple(names), complete)

    def _star_columns(self, kind: str, body: Node, level: Level, depth: int) -> Cols | None:
        if kind == "ColumnRef":
            fields = body.get("fields") or []
            if not fields or "A_Star" not in fields[-1]:
                return None
            if len(fields) == 1:
                names: list[str] = []
                complete = True
                for entry in level.items:
                    if entry.cols_visible:
                        names += entry.cols.names
                        complete = complete and entry.cols.complete
                return Cols(tuple(names), complete)
            if len(fields) == 2:
                return self._relation(name_list(fields[:1])[0], level).cols
            raise refuse(r.UNSUPPORTED_SYNTAX, "qualify columns with a table name or alias only")
        if kind == "A_Indirection":
            indirection = body.get("indirection") or []
            if len(indirection) == 1 and "A_Star" in indirection[0]:
                self.expr(body.get("arg"), level, depth)  # a cast to a refused type first
                return self._whole_row(body.get("arg"), level, depth).cols
        return None


def analyze(
    tree: Node,
    b: bytes,
    *,
    rules: Mapping[str, TableRule],
    schema: str | None,
    functions: frozenset[str],
    max_depth: int,
    allow_recursive: bool = True,
    placeholder: str = ":tenant_id",
    barrier: bool = True,
) -> tuple[Analysis, int, int]:
    """Check the single statement of ``tree``; its analysis and its byte span in ``b``."""
    stmts = tree.get("stmts") or []
    if not stmts:
        raise refuse(r.EMPTY_QUERY, "the query is empty")
    if len(stmts) > 1:
        raise refuse(
            r.MULTIPLE_STATEMENTS, "send exactly one statement", hint="remove the semicolons"
        )
    raw = stmts[0]
    kind, body = only(raw.get("stmt"))
    if kind != "SelectStmt":
        if kind in WRITES:
            raise refuse(r.NOT_A_SELECT, "only SELECT queries are accepted")
        raise refuse(r.NOT_A_SELECT, "only SELECT queries are accepted")
    walker = _Walker(b, rules, schema, functions, max_depth, allow_recursive, placeholder, barrier)
    try:
        walker.result.output = walker.query(body, None, 0)
    except RecursionError:
        raise refuse(r.TOO_COMPLEX, "query nests too deeply") from None
    start = int(raw.get("stmt_location", 0))
    length = int(raw.get("stmt_len", 0))
    end = start + length if length else len(b)
    return walker.result, start, end
