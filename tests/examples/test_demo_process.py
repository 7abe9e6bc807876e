"""``python -m examples.fastapi_app`` as a process: however it is stopped, no PostgreSQL is left.

Each test runs the demo on an embedded server in a folder of its own and reads the processes
back from the system (psutil), not from what the demo prints.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from tests.examples._process import ServerProcess, free_port

ROOT = Path(__file__).resolve().parents[2]
UP = "asgi-tenancy example is up"


def start_demo(folder: Path) -> ServerProcess:
    port = free_port()
    env = {**os.environ, "TENANCY_DEMO_DIR": str(folder), "PORT": str(port)}
    env["TENANCY_ISOLATION"] = "row"
    env.pop("DATABASE_URL", None)
    command = [sys.executable, "-m", "examples.fastapi_app"]
    return ServerProcess(command, cwd=ROOT, env=env, port=port)


def postgres_of(folder: Path) -> list[psutil.Process]:
    """The PostgreSQL processes serving the data folder under ``folder``."""
    pgdata = str((folder / "pgdata").resolve())
    found = []
    for process in psutil.process_iter(["name", "cmdline"]):
        if process.info["name"] == "postgres" and pgdata in (process.info["cmdline"] or []):
            found.append(process)
    return found


def users(folder: Path) -> list[int]:
    users: list[int] = json.loads((folder / "pgdata" / ".handle_pids.json").read_text())
    return users


STARTED: list[ServerProcess] = []


@pytest.fixture
def folder(tmp_path: Path) -> Iterator[Path]:
    """The demo's folder; whatever a failed test left running is stopped afterwards."""
    yield tmp_path
    while STARTED:
        STARTED.pop().kill()
    for process in postgres_of(tmp_path):
        process.terminate()
    psutil.wait_procs(postgres_of(tmp_path), timeout=10)


def start(folder: Path) -> ServerProcess:
    demo = start_demo(folder)
    STARTED.append(demo)
    demo.wait_for(UP)  # printed once uvicorn listens
    assert httpx.get(f"http://127.0.0.1:{demo.port}/health").json() == {"status": "ok"}
    assert postgres_of(folder)
    return demo


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_stops_the_demo_and_its_postgres(folder: Path, signum: int) -> None:
    demo = start(folder)
    assert demo.stop(signum) == 0
    assert "embedded PostgreSQL stopped\n" in demo.output
    assert postgres_of(folder) == []
    assert not (folder / "pgdata" / "postmaster.pid").exists()


def test_a_start_after_a_crash_takes_the_server_over_and_stops_it(folder: Path) -> None:
    crashed = start(folder)
    assert crashed.stop(signal.SIGKILL) == -signal.SIGKILL
    assert postgres_of(folder), "kill -9 leaves the server running: the case under test"
    assert users(folder) == [crashed.process.pid]  # a dead user pgserver would wait for

    demo = start(folder)
    assert users(folder) == [demo.process.pid]
    assert demo.stop(signal.SIGTERM) == 0
    assert "embedded PostgreSQL stopped\n" in demo.output
    assert postgres_of(folder) == []


def test_the_demo_starts_without_a_warning(folder: Path) -> None:
    demo = start(folder)
    assert demo.stop(signal.SIGTERM) == 0
    assert not [line for line in demo.output if "Warning" in line], demo.output
