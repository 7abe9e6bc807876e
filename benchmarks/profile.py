"""Where a scoped request's time goes: cProfile over the benchmark's ``GET /items/{id}``.

For each strategy, the scoped app of ``benchmarks/strategies.py`` serves ``REQUESTS`` in-process
requests under cProfile; the library's own functions are listed with their calls per request
and their own and cumulative time per request (µs, with the profiler's overhead: compare the
rows, not the absolute figures with the benchmark's). ``python -m benchmarks.profile row``.
Prints one JSON object.
"""

from __future__ import annotations

import asyncio
import cProfile
import json
import pstats
import sys

from benchmarks.common import create_app_role, machine, postgres
from benchmarks.strategies import SETUPS, _apps, _requests, _served

REQUESTS, TOP = 2000, 12


def _ours(stats: pstats.Stats) -> list[dict[str, object]]:
    rows = []
    for (filename, line, name), (_cc, nc, tt, ct, _) in stats.stats.items():  # type: ignore[attr-defined]
        if "asgi_tenancy" not in filename:
            continue
        short = filename.split("asgi_tenancy/", 1)[1]
        rows.append(
            {
                "function": f"{short}:{line} {name}",
                "calls_per_request": round(nc / REQUESTS, 2),
                "own_us": round(tt / REQUESTS * 1e6, 1),
                "cumulative_us": round(ct / REQUESTS * 1e6, 1),
            }
        )
    return sorted(rows, key=lambda r: -float(r["own_us"]))  # type: ignore[arg-type]


async def profile(name: str) -> dict[str, object]:
    with postgres() as admin_url:
        app_url = await create_app_role(admin_url)
        setup = await SETUPS[name](admin_url)
        engine, _, scoped = _apps(setup, app_url)
        try:
            async with _served(scoped):
                await _requests(scoped, 300)  # connect, prepare, warm every cache
                profiler = cProfile.Profile()
                profiler.enable()
                await _requests(scoped, REQUESTS)
                profiler.disable()
        finally:
            await engine.dispose()
            if setup.teardown is not None:
                await setup.teardown(admin_url)
    stats = pstats.Stats(profiler)
    total = sum(tt for (_, _, _), (_, _, tt, _, _) in stats.stats.items())  # type: ignore[attr-defined]
    ours = _ours(stats)
    return {
        "request_us_profiled": round(total / REQUESTS * 1e6, 1),
        "library_own_us": round(sum(float(r["own_us"]) for r in ours), 1),  # type: ignore[arg-type]
        "top": ours[:TOP],
    }


async def main(names: list[str]) -> dict[str, object]:
    return {
        "benchmark": "profile",
        "requests": REQUESTS,
        "results": {name: await profile(name) for name in names},
        "machine": machine(),
    }


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(sys.argv[1:] or ["row"])), indent=2))
