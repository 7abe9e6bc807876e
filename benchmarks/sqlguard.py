"""Benchmark the SQL guard; prints one JSON object.

- rewrite: microseconds per query over the shared corpus (tests/sqlguard/corpus.py), cold
  (cache disabled: limits, parse, analysis, splice) and cached (the LRU hit), median and p99;
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
from sqlalchemy.dialects.postgresql import asyncpg as pg_asyncpg
from sqlalchemy.engine import make_url

from asgi_tenancy import Tenant, tenant_scope
from asgi_tenancy.sqlguard import SqlGuard
from tests.sqlguard.corpus import (
    COUNTRIES,
    QUERIES,
    SCHEMA,
    SHARED_TABLES,
    TENANT_TABLES,
    TENANTS,
    tenant_rows,
)

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
    cold_guard = SqlGuard(TENANT_TABLES, SHARED_TABLES, cache_size=0)
    warm_guard = SqlGuard(TENANT_TABLES, SHARED_TABLES)
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
        guard = SqlGuard(TENANT_TABLES, SHARED_TABLES)
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
    finally:
        if server is not None:
            server.cleanup()
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
