"""What every benchmark shares: a PostgreSQL to run on, an app role, in-process ASGI requests,
timing and memory figures."""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import httpx
from sqlalchemy import text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import create_async_engine

APP_ROLE = "tenancy_bench"
APP_PASSWORD = "tenancy-bench"


@contextlib.contextmanager
def postgres() -> Iterator[URL]:
    """``DATABASE_URL`` (superuser) when set, else a throwaway pgserver PostgreSQL 16."""
    if url := os.environ.get("DATABASE_URL"):
        yield make_url(url).set(drivername="postgresql+asyncpg")
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns about XDG_RUNTIME_DIR as root
        import pgserver

        server = pgserver.get_server(
            tempfile.mkdtemp(prefix="tenancy-bench-"), cleanup_mode="delete"
        )
    try:
        yield make_url(server.get_uri()).set(drivername="postgresql+asyncpg")
    finally:
        server.cleanup()


async def create_app_role(admin_url: URL) -> URL:
    """A NOSUPERUSER NOBYPASSRLS role with DML on public tables; returns its URL."""
    engine = create_async_engine(admin_url, isolation_level="AUTOCOMMIT")
    async with engine.connect() as conn:
        exists = await conn.scalar(text(f"SELECT 1 FROM pg_roles WHERE rolname = '{APP_ROLE}'"))
        if not exists:
            await conn.execute(
                text(
                    f"CREATE ROLE {APP_ROLE} LOGIN NOSUPERUSER NOBYPASSRLS "
                    f"PASSWORD '{APP_PASSWORD}'"
                )
            )
        await conn.execute(text(f"GRANT USAGE ON SCHEMA public TO {APP_ROLE}"))
        await conn.execute(
            text(
                "ALTER DEFAULT PRIVILEGES GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES "
                f"TO {APP_ROLE}"
            )
        )
    await engine.dispose()
    return admin_url.set(username=APP_ROLE, password=APP_PASSWORD)


async def interleave(
    rounds: int, runs: dict[str, Callable[[], Awaitable[None]]]
) -> dict[str, list[float]]:
    """Run each contender once per round, alternating, so machine drift hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(rounds):
        order = list(runs.items()) if i % 2 == 0 else list(reversed(runs.items()))
        for name, run in order:
            start = time.perf_counter()
            await run()
            times[name].append(time.perf_counter() - start)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def machine() -> dict[str, object]:
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
    }


def http_scope(path: str, tenant: str) -> dict[str, Any]:
    """An ASGI ``GET path`` naming ``tenant`` in the ``x-tenant-id`` header."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"x-tenant-id", tenant.encode())],
        "client": ("127.0.0.1", 5000),
        "server": ("bench", 80),
    }


async def asgi_call(app: Any, scope: dict[str, Any]) -> int:
    """One in-process request (no network, no client library); its status code."""
    status = 0

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(scope, receive, send)
    return status


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def uvicorn_app(
    factory: str, probe: str, headers: dict[str, str], env: dict[str, str] | None = None
) -> Iterator[str]:
    """``factory``'s app (``module:function``) served by uvicorn, one worker, in a subprocess
    with ``env`` added to its environment; its base URL once ``probe`` answers 200."""
    port = _free_port()
    command = [sys.executable, "-m", "uvicorn", factory, "--factory", "--port", str(port)]
    options = ["--log-level", "warning", "--no-access-log"]
    process = subprocess.Popen([*command, *options], env={**os.environ, **(env or {})})
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base) as client:
            for _ in range(400):  # up within 20 s, or the benchmark fails
                with contextlib.suppress(httpx.TransportError):
                    status = client.get(probe, headers=headers).status_code
                    if status != 200:
                        raise RuntimeError(f"uvicorn ({factory}) answered {status}")
                    break
                if process.poll() is not None:
                    raise RuntimeError(f"uvicorn ({factory}) exited {process.returncode}")
                time.sleep(0.05)
            else:
                raise RuntimeError(f"uvicorn ({factory}) did not start")
        yield base
    finally:
        process.terminate()
        process.wait(10)


Calls = Callable[[httpx.AsyncClient], Callable[[], Awaitable[None]]]
#: ``requests(app, n)``: n requests to an in-process ASGI app, each asserted to succeed.
Requests = Callable[[Any, int], Awaitable[None]]


def paired_figures(
    times: dict[str, list[float]], per_round: int, label: str = "scoped"
) -> dict[str, object]:
    """req/s of ``baseline`` and ``label`` from interleaved rounds, and the µs added.

    ``ratio`` is the *paired* ratio: the median over rounds of baseline time / scoped time in
    the same round, so a slow stretch of the machine hits both sides of a pair alike.
    ``ratio_of_medians`` (what this figure was before 2026-12-04) and the quartiles of the
    per-round ratios come with it, to show the spread."""
    base_rps = per_round / median(times["baseline"])
    scoped_rps = per_round / median(times[label])
    pairs = sorted(b / s for b, s in zip(times["baseline"], times[label], strict=True))
    quartiles = statistics.quantiles(pairs, n=4) if len(pairs) > 1 else [pairs[0]] * 3
    return {
        "baseline_rps": round(base_rps),
        f"{label}_rps": round(scoped_rps),
        "ratio": round(median(pairs), 3),
        "ratio_of_medians": round(scoped_rps / base_rps, 3),
        "round_ratio_quartiles": [round(quartiles[0], 3), round(quartiles[2], 3)],
        "added_us_per_request": round((1 / scoped_rps - 1 / base_rps) * 1e6, 1),
    }


async def paired_rounds(
    plain: Any, scoped: Any, requests: Requests, *, rounds: int, per_round: int, warm_up: int
) -> dict[str, list[float]]:
    """One warm-up round, then ``rounds`` interleaved rounds of ``per_round`` requests each."""
    await interleave(
        1,
        {"baseline": lambda: requests(plain, warm_up), "scoped": lambda: requests(scoped, warm_up)},
    )
    return await interleave(
        rounds,
        {
            "baseline": lambda: requests(plain, per_round),
            "scoped": lambda: requests(scoped, per_round),
        },
    )


async def round_trips(
    counter: Any,
    apps: dict[str, Any],
    requests: Requests,
    serve: Callable[[Any], contextlib.AbstractAsyncContextManager[Any]],
    counted: int,
) -> dict[str, float]:
    """Round trips per request of each app, counted on the wire (``counter``: a WireCounter)
    after 50 requests that connect, prepare and warm the caches."""
    trips = {}
    for label, app in apps.items():
        async with serve(app):
            await requests(app, 50)
            before = counter.round_trips
            await requests(app, counted)
            trips[label] = (counter.round_trips - before) / counted
    return trips


async def compare_over_http(
    baseline: str, scoped: str, calls: Calls, rounds: int, requests: int, label: str = "scoped"
) -> dict[str, object]:
    """Interleaved rounds of ``calls`` (``requests`` each) against two servers, keep-alive,
    after one warm-up round: their req/s, the ratio, the µs ``scoped`` adds per request."""
    async with (
        httpx.AsyncClient(base_url=baseline) as b,
        httpx.AsyncClient(base_url=scoped) as s,
    ):
        runs = {"baseline": calls(b), label: calls(s)}
        await interleave(1, runs)
        times = await interleave(rounds, runs)
    return paired_figures(times, requests, label)
