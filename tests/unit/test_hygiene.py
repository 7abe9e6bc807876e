"""The session-hygiene verdicts come from PostgreSQL's grammar, never from matching text.

Generated spellings of every kind of session-changing statement (comments, case, quoting,
schema qualification, attribute notation, nesting in CTEs, subqueries, VALUES and CASE) must
be marked; statements that only mention those words (in literals, comments, identifiers) must
not. No regular expression passes both halves: that is the self-test that fails the suite if
hygiene ever goes back to a text match.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from asgi_tenancy.sqlalchemy.hygiene import CACHE_SIZE, SAFE_VOLATILE, Effect, Hygiene

# A realistic allow-list: what ``Hygiene.allowed_sql`` reads from pg_catalog, in short.
PURE = {"count", "lower", "upper", "coalesce", "now", "length", "sum", "max", "row_to_json"}
HYGIENE = Hygiene({*PURE, *SAFE_VOLATILE})

# Each leaves something on the session that outlives the transaction.
SESSION_CHANGING = [
    "SET search_path = public",
    "SET SESSION row_security = off",
    "SET app.tenant_id TO 'globex'",
    "RESET ALL",
    "RESET app.tenant_id",
    "DISCARD ALL",
    "DISCARD TEMP",
    "DISCARD PLANS",
    "PREPARE evil AS SELECT 1",
    "DEALLOCATE ALL",
    "EXECUTE evil",
    "LISTEN evil",
    "UNLISTEN *",
    "NOTIFY evil",
    "DO $$ BEGIN PERFORM 1; END $$",
    "CALL some_procedure()",
    "LOAD 'auto_explain'",
    "CREATE TEMP TABLE projects (id int)",
    "CREATE TEMPORARY VIEW v AS SELECT 1",
    "CREATE TABLE t (id int)",
    "ALTER TABLE projects ADD COLUMN x int",
    "DROP TABLE projects",
    "SELECT * INTO TEMP stolen FROM projects",
    "CREATE TEMP TABLE stolen AS SELECT * FROM projects",
    "DECLARE c CURSOR WITH HOLD FOR SELECT * FROM projects",
    "PREPARE TRANSACTION 'x'",
    "COPY projects TO '/tmp/x'",
    "SELECT set_config('app.tenant_id', 'globex', false)",
    "SELECT set_config('app.tenant_id', 'globex', 1 = 0)",
    "SELECT set_config('search_path', 'tenant_globex', $1)",
    "SELECT setseed(0.5)",
    "SELECT pg_advisory_lock(42)",
    "SELECT pg_try_advisory_lock(42)",
    "SELECT pg_advisory_lock_shared(42)",
    "SELECT pg_advisory_unlock_all()",
    "SELECT lo_open(1, 131072)",
    "SELECT query_to_xml('select * from projects', true, true, '')",
    "SELECT pg_notify('x', 'y')",
    "SELECT pg_terminate_backend(1)",
    "SELECT public.anything()",
    "SELECT my_own_function()",
    "SELECT (42::bigint).pg_advisory_lock",
    "SELECT p.id.pg_advisory_lock FROM projects p",
    "SELECT (0.5::float8).setseed",
]

# Mention the words, change nothing.
BENIGN = [
    "SELECT 'SET search_path = x' AS a",
    "SELECT 1 -- set_config('a', 'b', false)",
    "SELECT 1 /* DISCARD ALL */",
    'SELECT "set" FROM projects',
    "SELECT name FROM projects WHERE name LIKE '%pg_advisory_lock(%'",
    "SELECT set_config('app.tenant_id', 'acme', true)",
    "SET LOCAL statement_timeout = '1s'",
    "SELECT lower(name), count(*) FROM projects GROUP BY 1",
    "SELECT now(), coalesce(name, 'x') FROM projects",
    "SELECT row_to_json(p) FROM projects p",
    "BEGIN",
    "COMMIT",
    "ROLLBACK",
    "SAVEPOINT sa_savepoint_1",
    "RELEASE SAVEPOINT sa_savepoint_1",
    "SHOW search_path",
    "SELECT pg_advisory_xact_lock(42)",
    "SELECT random(), gen_random_uuid(), clock_timestamp()",
    "DECLARE c CURSOR FOR SELECT * FROM projects",
    "FETCH 10 FROM c",
    "LOCK TABLE projects IN SHARE MODE",
    "SELECT p.id, p.name FROM projects p WHERE p.id = $1",
    "UPDATE projects SET name = $1 WHERE id = $2",
    "DELETE FROM projects WHERE id = $1",
    "EXPLAIN SELECT * FROM projects",
]


def _decorate(sql: str, comment: str, case: str, space: str) -> str:
    text = {"lower": sql.lower(), "upper": sql.upper(), "keep": sql}[case]
    if "$$" in sql or "'" in sql:
        text = sql  # literals and dollar quotes keep their case
    return f"{comment}{space}{text}{space}"


@given(
    st.sampled_from(SESSION_CHANGING),
    st.sampled_from(["", "/* x */", "-- x\n", "/* nested /* comment */ */"]),
    st.sampled_from(["keep", "lower", "upper"]),
    st.sampled_from(["", " ", "\n\t"]),
)
def test_every_spelling_of_a_session_change_is_marked(
    sql: str, comment: str, case: str, space: str
) -> None:
    assert HYGIENE.effect(_decorate(sql, comment, case, space)) & Effect.SESSION


@given(
    st.sampled_from(
        [
            "SELECT set_config('a.b', 'c', false)",
            "SELECT pg_advisory_lock(1)",
            "SELECT setseed(0.1)",
            "SELECT my_own_function()",
        ]
    ),
    st.sampled_from(
        [
            "WITH x AS ({}) SELECT * FROM x",
            "SELECT * FROM projects WHERE id IN ({})",
            "SELECT CASE WHEN true THEN ({}) END",
            "SELECT * FROM (VALUES (({}))) v",
            "INSERT INTO projects (id) SELECT 1 FROM ({}) s",
            "UPDATE projects SET name = (SELECT ({})::text)",
            "EXPLAIN ANALYZE {}",
            "SELECT 1; {}",
            "SELECT EXISTS ({})",
        ]
    ),
    st.sampled_from(["{}", '"{}"', "pg_catalog.{}", 'pg_catalog."{}"']),
)
def test_a_session_changing_call_is_marked_wherever_it_sits(
    inner: str, shape: str, spelling: str
) -> None:
    name = inner.split("SELECT ", 1)[1].split("(", 1)[0]
    if name == "my_own_function" and spelling.startswith("pg_catalog"):
        spelling = "public.{}"
    call = inner.replace(name, spelling.format(name), 1)
    assert HYGIENE.effect(shape.format(call)) & Effect.SESSION


def test_words_in_literals_comments_and_identifiers_change_nothing() -> None:
    for sql in BENIGN:
        assert HYGIENE.effect(sql) == Effect.NONE, sql


def test_no_text_pattern_agrees_with_the_grammar() -> None:
    """The self-test: a text match that marks the first half must mark some of the second."""
    marked = [HYGIENE.effect(sql) & Effect.SESSION for sql in SESSION_CHANGING]
    clean = [not HYGIENE.effect(sql) & Effect.SESSION for sql in BENIGN]
    assert all(marked)
    assert all(clean)
    # The keywords a text match would look for appear on both sides.
    for word in ("set_config", "SET", "DISCARD", "pg_advisory_lock"):
        assert any(word.lower() in s.lower() for s in SESSION_CHANGING)
        assert any(word.lower() in s.lower() for s in BENIGN)


def test_what_the_grammar_cannot_read_is_marked() -> None:
    for sql in ("SELEC 1", "SELECT (", "\x00", "SET", "'unterminated"):
        assert HYGIENE.effect(sql) & Effect.SESSION


def test_sequence_draws_are_noted_not_marked() -> None:
    for sql in (
        "INSERT INTO projects (name) VALUES ($1) RETURNING id",
        "SELECT nextval('projects_id_seq')",
        "SELECT currval('projects_id_seq')",
        "SELECT nextval('public.projects_id_seq'::regclass)",
        "SELECT setval('projects_id_seq', 10)",
    ):
        assert HYGIENE.effect(sql) == Effect.SEQUENCES, sql


@pytest.mark.parametrize(
    "name",
    [
        "'pg_temp.tenancy_counter'",
        "'tenancy_counter'",
        "'PG_TEMP.TENANCY_COUNTER'",
        "'\"tenancy_counter\"'",
        "'pg_temp.tenancy_counter'::regclass",
        "U&'\\0074enancy_counter'",
        "E'\\x74enancy_counter'",
        "16385",
        "16385::regclass",
        "'pg_temp.' || 'tenancy_counter'",
        "(SELECT 'tenancy_counter')",
        "format('%s', 'tenancy_counter')",
        "$$tenancy_counter$$",
        "$x$pg_temp.tenancy_counter$x$",
    ],
)
@pytest.mark.parametrize("call", ["nextval({})", "pg_catalog.nextval({})", "setval({}, 1)"])
def test_a_draw_that_may_move_the_signed_counter_marks_the_session(call: str, name: str) -> None:
    """The signed binding's counter moves in step with the application; a draw of it (or of a
    sequence named by anything but a plain string) gets the connection replaced."""
    sql = f"SELECT {call.format(name)}"
    assert HYGIENE.effect(sql) & Effect.SESSION, sql


def test_a_draw_in_attribute_notation_marks_the_session() -> None:
    assert HYGIENE.effect("SELECT p.id.nextval FROM projects p") & Effect.SESSION
    assert HYGIENE.effect("SELECT (16385::regclass).nextval") & Effect.SESSION


def test_an_empty_allow_list_marks_every_call() -> None:
    unloaded = Hygiene()
    assert unloaded.effect("SELECT count(*) FROM projects") & Effect.SESSION
    assert unloaded.effect("SELECT 1") == Effect.NONE


def test_the_verdict_cache_is_bounded() -> None:
    hygiene = Hygiene(PURE)
    for i in itertools.islice(itertools.count(), CACHE_SIZE + 50):
        hygiene.effect(f"SELECT {i}")
    assert len(hygiene._verdicts) == CACHE_SIZE
