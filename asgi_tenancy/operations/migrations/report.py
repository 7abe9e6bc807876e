"""What a migration run reports: each tenant's result, the whole run, and who follows it."""

from __future__ import annotations

import enum
import json
from dataclasses import asdict, dataclass
from typing import Any, Protocol

__all__ = ["MigrationObserver", "MigrationReport", "MigrationResult", "MigrationStatus"]


class MigrationStatus(enum.StrEnum):
    """What happened to one tenant."""

    OK = "ok"
    SKIPPED = "skipped"  # already at head: no Alembic run, no registry change
    FAILED = "failed"
    DRY_RUN = "dry-run"  # would migrate; nothing was changed
    WOULD_FAIL = "would-fail"  # dry run: the migration is known to fail (see its error)
    STAMPED = "stamped"  # adopted: tables made from metadata, version set to head, no DDL
    NOT_RUN = "not-run"  # left alone because a canary failed


@dataclass(frozen=True, slots=True)
class MigrationResult:
    """One tenant's outcome; ``error`` is the database's message, never a DSN."""

    tenant_id: str
    status: MigrationStatus
    from_revision: str | None
    to_revision: str | None
    error: str | None = None
    duration_s: float = 0.0


@dataclass(frozen=True, slots=True)
class MigrationReport:
    """Every tenant's result, in the order of the tenant list; ``shared`` first when run."""

    results: tuple[MigrationResult, ...]
    head: str
    shared: MigrationResult | None = None
    dry_run: bool = False
    concurrency: int = 1
    duration_s: float = 0.0

    @property
    def ok(self) -> bool:
        """No target failed and none was left unrun."""
        bad = (MigrationStatus.FAILED, MigrationStatus.NOT_RUN, MigrationStatus.WOULD_FAIL)
        everything = [*self.results, *([self.shared] if self.shared else [])]
        return not any(result.status in bad for result in everything)

    def counts(self) -> dict[str, int]:
        counts = {status.value: 0 for status in MigrationStatus}
        for result in self.results:
            counts[result.status.value] += 1
        return counts

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "head": self.head,
            "dry_run": self.dry_run,
            "concurrency": self.concurrency,
            "duration_s": round(self.duration_s, 3),
            "counts": self.counts(),
            "shared": None if self.shared is None else _result_dict(self.shared),
            "tenants": [_result_dict(result) for result in self.results],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict())


def _result_dict(result: MigrationResult) -> dict[str, Any]:
    body = asdict(result)
    body["status"] = result.status.value
    body["duration_s"] = round(result.duration_s, 4)
    return body


class MigrationObserver(Protocol):
    """Follows a run: how many tenants, each real migration's start (inside the concurrency
    bound), and every tenant's result, skipped ones included."""

    def begin(self, total: int) -> None: ...

    def started(self, tenant_id: str) -> None: ...

    def finished(self, result: MigrationResult) -> None: ...
