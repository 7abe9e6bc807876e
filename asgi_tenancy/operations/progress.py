"""Progress of ``asgi-tenancy migrate``: a bar on a terminal, one plain line per tenant in CI."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from .migrations import MigrationReport, MigrationResult

_BAR_WIDTH = 30


def progress_for(stream: TextIO, *, json_output: bool) -> LineProgress | BarProgress:
    """A bar when ``stream`` is a terminal outside CI; plain lines otherwise (logs keep them)."""
    in_ci = os.environ.get("CI", "").lower() in ("1", "true", "yes")
    if stream.isatty() and not in_ci:
        return BarProgress(stream)
    return LineProgress(stream, summary=not json_output)


class LineProgress:
    """``tenant status from -> to (seconds)[: error]``, one line per tenant, then a summary."""

    def __init__(self, stream: TextIO, *, summary: bool = True) -> None:
        self._stream = stream
        self._summary = summary

    def begin(self, total: int) -> None:
        pass

    def started(self, tenant_id: str) -> None:
        pass

    def finished(self, result: MigrationResult) -> None:
        line = (
            f"{result.tenant_id} {result.status.value} "
            f"{result.from_revision or 'base'} -> {result.to_revision or 'base'} "
            f"({result.duration_s:.2f}s)"
        )
        if result.error:
            line += f": {result.error}"
        print(line, file=self._stream, flush=True)

    def close(self, report: MigrationReport) -> None:
        if self._summary:
            print(_summary(report), file=self._stream, flush=True)


class BarProgress:
    """One line redrawn in place; failures are printed above it as they happen."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._total = 0
        self._done = 0
        self._failed = 0
        self._started = time.monotonic()

    def begin(self, total: int) -> None:
        self._total = total
        self._draw()

    def started(self, tenant_id: str) -> None:
        pass

    def finished(self, result: MigrationResult) -> None:
        self._done += 1
        if result.error and result.status.value in ("failed", "would-fail"):
            self._failed += 1
            self._stream.write(
                f"\r\x1b[K{result.tenant_id} {result.status.value}: {result.error}\n"
            )
        self._draw()

    def close(self, report: MigrationReport) -> None:
        self._stream.write("\r\x1b[K" + _summary(report) + "\n")
        self._stream.flush()

    def _draw(self) -> None:
        share = self._done / self._total if self._total else 1.0
        filled = round(share * _BAR_WIDTH)
        elapsed = time.monotonic() - self._started
        self._stream.write(
            f"\r\x1b[K[{'#' * filled}{'.' * (_BAR_WIDTH - filled)}] "
            f"{self._done}/{self._total} failed {self._failed} {elapsed:.1f}s"
        )
        self._stream.flush()


def _summary(report: MigrationReport) -> str:
    counts = ", ".join(f"{name} {count}" for name, count in report.counts().items() if count)
    shared = f"shared {report.shared.status.value}; " if report.shared is not None else ""
    return f"{shared}{counts or 'no tenants'} in {report.duration_s:.2f}s (head {report.head})"
