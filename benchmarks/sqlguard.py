"""Benchmark the SQL guard; prints one JSON object.

- rewrite: microseconds per query over the shared corpus (tests/sqlguard/corpus.py), cold
  (cache disabled: limits, parse, analysis, splice, ``text()``) and cached (the LRU hit), median
  and p99; the ~300-character reference report (corpus.REPORT) cold, against PostgreSQL's own
  parser on the same text (the baseline: what any guard built on it pays at least);
- worst cases: CPU milliseconds for inputs of 16, 32 and 64 KB built to be expensive (many
  references, calls, literals on the scanner's path, outer references 99 levels up, CTEs);
- run(): the guarded run (prelude, capped query, clean-up check, rollback) against executing
  the same rewritten statement in a plain transaction;
- execution: each corpus query run as written (unguarded) and rewritten (guarded) on the same
  database holding only the tenant's rows, so the ratio is the guard's own cost; also the
  guarded query on the shared database holding every tenant, for reference;
- peak RSS of this process.

Uses DATABASE_URL (a superuser URL) when set, otherwise starts a throwaway ``pgserver``.
Run from the repository root: ``python benchmarks/sqlguard.py [--scale N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import sys
import tempfile
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import asyncpg
from pglast import parser as pg_parser
from sqlalchemy.dialects.postgresql import asyncpg as pg_asyncpg
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from asgi_tenancy import Tenant, tenant_scope
from asgi_tenancy.sqlguard import SqlGuard, UnsafeQuery
from tests.sqlguard.corpus import (
    COUNTRIES,
    QUERIES,
    REPORT,
    SCHEMA,
    SHARED_TABLES,
    TENANT_TABLES,
    TENANTS,
    tenant_rows,
)
from tests.sqlguard.oracle import COLUMNS

TENANT = TENANTS[0]


def _percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _summary(samples: list[float]) -> dict[str, float]:
    return {
        "median_us": round(statistics.median(samples), 2),
        "p99_us": round(_percentile(samples, 0.99), 2),
    }


def bench_rewrite(repeat: int) -> dict[str, Any]:
    cold_guard = SqlGuard(TENANT_TABLES, SHARED_TABLES, columns=COLUMNS, cache_size=0)
    warm_guard = SqlGuard(TENANT_TABLES, SHARED_TABLES, columns=COLUMNS)
    cold: list[float] = []
    cached: list[float] = []
    per_query_cold: list[float] = []
    per_query_best: list[float] = []
    clock = time.perf_counter_ns
    with tenant_scope(Tenant(TENANT)):
        for sql in QUERIES:
            cold_guard.rewrite(sql)
            warm_guard.rewrite(sql)
        for sql in QUERIES:
            samples = []
            for _ in range(repeat):
                start = clock()
                cold_guard.rewrite(sql)
                samples.append((clock() - start) / 1_000)
            cold += samples
            per_query_cold.append(statistics.median(samples))
            per_query_best.append(min(samples))
            for _ in range(repeat):
                start = clock()
                warm_guard.rewrite(sql)
                cached.append((clock() - start) / 1_000)
    return {
        "queries": len(QUERIES),
        "samples_per_query": repeat,
        "mean_query_chars": round(statistics.mean(len(q) for q in QUERIES), 1),
        "cold": _summary(cold),
        "cold_per_query_median_us": {
            "median": round(statistics.median(per_query_cold), 2),
            "max": round(max(per_query_cold), 2),
        },
        # the best of the samples of each query: the least disturbed by other load on the host
        "cold_per_query_best_us": {
            "median": round(statistics.median(per_query_best), 2),
            "p99": round(_percentile(per_query_best, 0.99), 2),
        },
        "cached": _summary(cached),
        "report": bench_report(cold_guard, repeat * 50),
    }


def bench_report(guard: SqlGuard, repeat: int) -> dict[str, Any]:
    """The ~300-character report, cold, against pglast's parse of the same text."""
    clock = time.perf_counter_ns
    rewrite: list[float] = []
    parse: list[float] = []
    with tenant_scope(Tenant(TENANT)):
        guard.rewrite(REPORT)
        for _ in range(repeat):  # interleaved, so load drifts hit both alike
            start = clock()
            guard.rewrite(REPORT)
            rewrite.append((clock() - start) / 1_000)
            start = clock()
            pg_parser.parse_sql_json(REPORT)
            parse.append((clock() - start) / 1_000)
    return {
        "chars": len(REPORT),
        "samples": repeat,
        "cold_rewrite": _summary(rewrite),
        "cold_rewrite_best_us": round(min(rewrite), 2),
        "baseline_parse": _summary(parse),
        "ratio_median": round(statistics.median(rewrite) / statistics.median(parse), 2),
    }


def _fill(head: str, unit: str, tail: str, size: int, sep: str = ", ") -> str:
    count = (size - len(head) - len(tail)) // (len(unit) + len(sep))
    return head + sep.join([unit] * count) + tail


def _outer_references(size: int) -> str:
    levels = "".join(f"SELECT 1 FROM orders o{i} WHERE o{i}.id IN (" for i in range(1, 99))
    head = "SELECT 1 FROM orders o0 WHERE o0.id IN (" + levels + "SELECT 1 FROM orders z WHERE "
    return _fill(head, "o0.id = z.id", ")" * 99, size, " OR ")


WORST_CASES = {
    "column_references": lambda n: _fill("SELECT ", "o.id", " FROM orders o", n),
    "function_calls": lambda n: _fill("SELECT ", "lower(c.name)", " FROM customers c", n),
    "literals_on_the_scanner_path": lambda n: _fill("SELECT ", "'a$b'", " FROM orders -- :x", n),
    "in_list": lambda n: _fill("SELECT 1 FROM orders WHERE id IN (", "1", ")", n),
    "outer_references_99_levels_up": _outer_references,
    "table_forms_over_the_relation_cap": lambda n: _fill(
        "SELECT * FROM ", "(TABLE orders) t", "", n
    ),
}


def bench_worst_cases() -> dict[str, Any]:
    """CPU milliseconds per input (best of 3), and the outcome, at 16, 32 and 64 KB."""
    guard = SqlGuard(TENANT_TABLES, SHARED_TABLES, columns=COLUMNS, cache_size=0, max_length=65_536)
    out: dict[str, Any] = {}
    with tenant_scope(Tenant(TENANT)):
        for label, make in WORST_CASES.items():
            rows = []
            for size in (16_384, 32_768, 65_536):
                sql = make(size)
                best = float("inf")
                outcome = "rewritten"
                for _ in range(3):
                    start = time.process_time()
                    try:
                        guard.rewrite(sql)
                    except UnsafeQuery as exc:
                        outcome = f"refused ({exc.reason})"
                    best = min(best, time.process_time() - start)
                rows.append(
                    {"bytes": len(sql), "cpu_ms": round(best * 1000, 1), "outcome": outcome}
                )
            out[label] = rows
    out["max_cpu_ms_at_64kb"] = max(rows[-1]["cpu_ms"] for rows in out.values())
    return out


async def bench_run(admin_url: str, repeat: int) -> dict[str, Any]:
    """guard.run() against the same rewritten statement executed in a plain transaction."""
    url = make_url(admin_url).set(drivername="postgresql+asyncpg")
    engine = create_async_engine(url, pool_size=1)
    guard = SqlGuard(TENANT_TABLES, SHARED_TABLES, columns=COLUMNS)
    plain: list[float] = []
    guarded: list[float] = []
    try:
        async with AsyncSession(engine) as session:
            with tenant_scope(Tenant(TENANT)):
                query = guard.rewrite(REPORT)
                for _ in range(repeat):
                    start = time.perf_counter_ns()
                    async with session.begin():
                        (await session.execute(query.statement)).mappings().all()
                    plain.append((time.perf_counter_ns() - start) / 1_000)
                    start = time.perf_counter_ns()
                    await guard.run(session, REPORT)
                    guarded.append((time.perf_counter_ns() - start) / 1_000)
    finally:
        await engine.dispose()
    return {
        "query": "corpus.REPORT",
        "samples": repeat,
        "plain_transaction": _summary(plain),
        "run": _summary(guarded),
        "ratio_median": round(statistics.median(guarded) / statistics.median(plain), 2),
        "round_trips": {"plain_transaction": 3, "run": 5},
    }


def _literal(value: object) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    if hasattr(value, "isoformat"):
        return f"DATE '{value.isoformat()}'"
    return repr(value)


async def _load(conn: asyncpg.Connection, tenants: tuple[str, ...], scale: int) -> None:
    columns = {
        "customers": "tenant_id, id, name, country, segment, created_at",
        "orders": "tenant_id, id, customer_id, status, total, created_at",
        "order_items": "tenant_id, order_id, line, product, quantity, unit_price",
    }
    for ddl in SCHEMA:
        await conn.execute(ddl)
    await conn.executemany("INSERT INTO countries VALUES ($1, $2, $3)", COUNTRIES)
    for tenant in tenants:
        for table, rows in tenant_rows(tenant, scale).items():
            for start in range(0, len(rows), 1000):
                values = ", ".join(
                    "(" + ", ".join(_literal(v) for v in row) + ")"
                    for row in rows[start : start + 1000]
                )
                await conn.execute(f"INSERT INTO {table} ({columns[table]}) VALUES {values}")
    await conn.execute("ANALYZE")


async def _pair(
    first: tuple[asyncpg.Connection, str, list[str]],
    second: tuple[asyncpg.Connection, str, list[str]],
    repeat: int,
) -> tuple[float, float]:
    """Median microseconds of two statements, run alternately so load drifts hit both alike."""
    samples: tuple[list[float], list[float]] = ([], [])
    for conn, sql, args in (first, second):
        await conn.fetch(sql, *args)  # prepare and warm
    for _ in range(repeat):
        for index, (conn, sql, args) in enumerate((first, second)):
            start = time.perf_counter_ns()
            await conn.fetch(sql, *args)
            samples[index].append((time.perf_counter_ns() - start) / 1_000)
    return statistics.median(samples[0]), statistics.median(samples[1])


async def bench_execution(admin_url: str, scale: int, repeat: int) -> dict[str, Any]:
    url = make_url(admin_url)
    connect: dict[str, Any] = {
        "user": url.username,
        "password": url.password,
        "host": url.query.get("host", url.host),
        "port": url.port,
    }
    names = {label: f"bench_sqlguard_{label}_{uuid.uuid4().hex[:6]}" for label in ("shared", "one")}
    admin = await asyncpg.connect(database=url.database or "postgres", **connect)
    try:
        for name in names.values():
            await admin.execute(f'CREATE DATABASE "{name}"')
        shared = await asyncpg.connect(database=names["shared"], **connect)
        one = await asyncpg.connect(database=names["one"], **connect)
        await _load(shared, TENANTS, scale)
        await _load(one, (TENANT,), scale)
        guard = SqlGuard(TENANT_TABLES, SHARED_TABLES, columns=COLUMNS)
        dialect = pg_asyncpg.dialect()
        unguarded: list[float] = []
        guarded: list[float] = []
        guarded_shared: list[float] = []
        with tenant_scope(Tenant(TENANT)):
            for sql in QUERIES:
                query = guard.rewrite(sql)
                compiled = query.statement.compile(dialect=dialect)
                args = [TENANT] if query.params else []
                plain, rewritten = await _pair((one, sql, []), (one, str(compiled), args), repeat)
                unguarded.append(plain)
                guarded.append(rewritten)
                _, on_shared = await _pair((one, sql, []), (shared, str(compiled), args), 3)
                guarded_shared.append(on_shared)
        await shared.close()
        await one.close()
    finally:
        for name in names.values():
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
    ratios = [g / u for g, u in zip(guarded, unguarded, strict=True)]
    counts = {table: len(rows) for table, rows in tenant_rows(TENANT, scale).items()}
    return {
        "tenant_rows": counts,
        "tenants_in_shared_db": len(TENANTS),
        "samples_per_query": repeat,
        "unguarded_total_us": round(sum(unguarded)),
        "guarded_total_us": round(sum(guarded)),
        "ratio_total": round(sum(guarded) / sum(unguarded), 3),
        "ratio_median": round(statistics.median(ratios), 3),
        "ratio_p90": round(_percentile(ratios, 0.9), 3),
        "shared_db_guarded_total_us": round(sum(guarded_shared)),
        "shared_db_ratio_total": round(sum(guarded_shared) / sum(unguarded), 3),
    }


async def bench_run_on_loaded(admin_url: str, scale: int, repeat: int) -> dict[str, Any]:
    url = make_url(admin_url)
    connect: dict[str, Any] = {
        "user": url.username,
        "password": url.password,
        "host": url.query.get("host", url.host),
        "port": url.port,
    }
    name = f"bench_sqlguard_run_{uuid.uuid4().hex[:6]}"
    admin = await asyncpg.connect(database=url.database or "postgres", **connect)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        conn = await asyncpg.connect(database=name, **connect)
        await _load(conn, TENANTS, scale)
        await conn.close()
        return await bench_run(url.set(database=name).render_as_string(False), repeat)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=40, help="rows per tenant multiplier")
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    result: dict[str, Any] = {
        "benchmark": "sqlguard",
        "python": sys.version.split()[0],
        "load_average_1m": round(os.getloadavg()[0], 2),
        "cpus": os.cpu_count(),
    }
    result["rewrite"] = bench_rewrite(args.repeat)
    result["worst_cases"] = bench_worst_cases()
    admin_url = os.environ.get("DATABASE_URL")
    server = None
    if admin_url is None:
        import pgserver

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            server = pgserver.get_server(
                tempfile.mkdtemp(prefix="sqlguard-bench-"), cleanup_mode="stop"
            )
        admin_url = server.get_uri()
    try:
        result["execution"] = asyncio.run(bench_execution(admin_url, args.scale, args.repeat))
        result["run"] = asyncio.run(bench_run_on_loaded(admin_url, args.scale, args.repeat * 10))
    finally:
        if server is not None:
            server.cleanup()
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
