"""The example API. Every route below runs inside exactly one tenant, or is refused.

Nothing in the handlers filters by tenant: the middleware resolves and scopes the request,
``tenant_session`` yields a session bound to that tenant, and the strategy does the rest.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import (
    BackgroundTasks,
    Depends,
    FastAPI,
    HTTPException,
    Path,
    Query,
    Request,
    WebSocket,
)
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import selectinload
from starlette.websockets import WebSocketDisconnect

from asgi_tenancy import HeaderResolver, JWTClaimResolver, TenancyMiddleware, Tenant, TenantStore
from asgi_tenancy.fastapi import current_tenant, setup_tenancy, tenant_session
from asgi_tenancy.sqlalchemy import IsolationStrategy, SchemaPerTenant, TenantDatabase
from asgi_tenancy.sqlguard import SqlGuard

from .models import AuditEvent, Base, Project, Task

log = logging.getLogger("examples.fastapi_app")

Session = Annotated[AsyncSession, Depends(tenant_session)]
CurrentTenant = Annotated[Tenant, Depends(current_tenant)]

# Every input is bounded where the database would otherwise fail on it (a 500): ids fit the
# INTEGER columns, offsets too, and text holds no NUL, which PostgreSQL cannot store (pydantic
# already refuses unpaired surrogates). Out of range is a 422 problem, never a query.
INT32_MAX = 2**31 - 1
NO_NUL = r"^[^\x00]*$"
MAX_BODY_BYTES = 256 * 1024  # a 20,000-character query fits, even with every character escaped
ProjectId = Annotated[int, Path(ge=1, le=INT32_MAX)]
Limit = Annotated[int, Query(ge=1, le=100)]
Offset = Annotated[int, Query(ge=0, le=INT32_MAX)]


class ProjectIn(BaseModel):
    name: str = Field(min_length=1, max_length=200, pattern=NO_NUL)


class ProjectPatch(BaseModel):
    name: str | None = Field(default=None, min_length=1, max_length=200, pattern=NO_NUL)


class TaskIn(BaseModel):
    title: str = Field(min_length=1, max_length=200, pattern=NO_NUL)


class ReportIn(BaseModel):
    sql: str = Field(min_length=1, max_length=20_000, pattern=NO_NUL)


class TaskOut(BaseModel):
    id: int
    project_id: int
    title: str
    done: bool


class ProjectOut(BaseModel):
    id: int
    name: str
    tasks: list[TaskOut] = []


class ProjectPage(BaseModel):
    total: int
    items: list[ProjectOut]


class ExportLine(BaseModel):
    """One line of ``/export``."""

    id: int
    title: str


class ReportOut(BaseModel):
    rows: list[dict[str, Any]]


class NDJSONResponse(StreamingResponse):
    media_type = "application/x-ndjson"


NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"description": "No such project here"}}


class _Events:
    """Task events fanned out to the websockets of one tenant only."""

    def __init__(self) -> None:
        self._queues: dict[str, set[asyncio.Queue[dict[str, Any]]]] = defaultdict(set)

    def publish(self, tenant_id: str, event: dict[str, Any]) -> None:
        for queue in self._queues[tenant_id]:
            queue.put_nowait(event)

    def subscribe(self, tenant_id: str) -> asyncio.Queue[dict[str, Any]]:
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=100)
        self._queues[tenant_id].add(queue)
        return queue

    def unsubscribe(self, tenant_id: str, queue: asyncio.Queue[dict[str, Any]]) -> None:
        self._queues[tenant_id].discard(queue)


def _project_out(project: Project) -> ProjectOut:
    return ProjectOut(
        id=project.id,
        name=project.name,
        tasks=[
            TaskOut(id=t.id, project_id=t.project_id, title=t.title, done=t.done)
            for t in project.tasks
        ],
    )


def report_guard(strategy: IsolationStrategy) -> SqlGuard:
    """The SQL guard for ``/reports/query``, configured for how the tenant's rows are stored.

    Shared tables (row, query) and per-tenant databases: every tenant table is replaced by a
    subquery filtered on ``tenant_id``. Schema per tenant: the tables live in the tenant's schema,
    so names stay unqualified (``schema=None``) and the session's search_path confines them.
    """
    if isinstance(strategy, SchemaPerTenant):
        return SqlGuard({t.name: None for t in strategy.tenant_tables()}, schema=None)
    return SqlGuard.from_metadata(Base.metadata)


def create_app(
    database: TenantDatabase,
    store: TenantStore,
    *,
    jwt_secret: str,
    jwt_audience: str = "demo",
    guard: SqlGuard | None = None,
) -> FastAPI:
    """The API over ``database``, tenants from ``store``, HS256 tokens under ``jwt_secret``."""
    app = FastAPI(title="asgi-tenancy example")
    events = _Events()
    reports = guard if guard is not None else report_guard(database.strategy)

    # Header and token must agree when both are present: a header can never override the
    # tenant a verified token names.
    app.add_middleware(
        TenancyMiddleware,
        resolvers=[
            HeaderResolver("x-tenant-id"),
            JWTClaimResolver(
                key=jwt_secret, algorithms=["HS256"], claim="org_id", audience=jwt_audience
            ),
        ],
        store=store,
        exempt=["/health", "/docs", "/openapi.json"],
    )
    setup_tenancy(app, database=database, problem_details=True, max_body_size=MAX_BODY_BYTES)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/projects")
    async def list_projects(session: Session, limit: Limit = 20, offset: Offset = 0) -> ProjectPage:
        total = await session.scalar(select(func.count()).select_from(Project))
        rows = await session.scalars(
            select(Project)
            .options(selectinload(Project.tasks))
            .order_by(Project.id)
            .limit(limit)
            .offset(offset)
        )
        return ProjectPage(total=total or 0, items=[_project_out(p) for p in rows])

    @app.post("/projects", status_code=201)
    async def create_project(body: ProjectIn, session: Session) -> ProjectOut:
        project = Project(name=body.name, tasks=[])
        session.add(project)
        await session.commit()
        return _project_out(project)

    async def _get_project(session: AsyncSession, project_id: int) -> Project:
        project = await session.scalar(
            select(Project).options(selectinload(Project.tasks)).where(Project.id == project_id)
        )
        if project is None:
            raise HTTPException(404, "project not found")
        return project

    @app.get("/projects/{project_id}", responses=NOT_FOUND)
    async def get_project(project_id: ProjectId, session: Session) -> ProjectOut:
        return _project_out(await _get_project(session, project_id))

    @app.patch("/projects/{project_id}", responses=NOT_FOUND)
    async def update_project(
        project_id: ProjectId, body: ProjectPatch, session: Session
    ) -> ProjectOut:
        project = await _get_project(session, project_id)
        if body.name is not None:
            project.name = body.name
        await session.commit()
        return _project_out(project)

    @app.delete("/projects/{project_id}", status_code=204, responses=NOT_FOUND)
    async def delete_project(project_id: ProjectId, session: Session) -> None:
        await session.delete(await _get_project(session, project_id))
        await session.commit()

    async def _audit(message: str) -> None:
        # Runs after the response, still inside the request's tenant scope.
        async with database.session() as session:
            session.add(AuditEvent(message=message))
            await session.commit()

    @app.post("/projects/{project_id}/tasks", status_code=201, responses=NOT_FOUND)
    async def create_task(
        project_id: ProjectId,
        body: TaskIn,
        session: Session,
        tenant: CurrentTenant,
        background: BackgroundTasks,
    ) -> TaskOut:
        project = await _get_project(session, project_id)
        task = Task(project_id=project.id, title=body.title)
        session.add(task)
        await session.commit()
        out = TaskOut(id=task.id, project_id=task.project_id, title=task.title, done=task.done)
        events.publish(tenant.id, {"event": "task_created", "task": out.model_dump()})
        background.add_task(_audit, f"task {task.id} created: {task.title}")
        return out

    @app.get("/audit")
    async def audit(session: Session) -> list[str]:
        return list(await session.scalars(select(AuditEvent.message).order_by(AuditEvent.id)))

    @app.get(
        "/export",
        response_class=NDJSONResponse,
        responses={
            200: {
                "description": "One JSON object per line (NDJSON)",
                "content": {"application/x-ndjson": {"schema": ExportLine.model_json_schema()}},
            }
        },
    )
    async def export(session: Session) -> NDJSONResponse:
        """Every task as NDJSON, streamed: the scope holds until the last byte is sent."""

        async def lines() -> AsyncIterator[bytes]:
            result = await session.stream_scalars(select(Task).order_by(Task.id))
            async for task in result:
                yield (json.dumps({"id": task.id, "title": task.title}) + "\n").encode()

        return NDJSONResponse(lines())

    @app.get(
        "/me",
        openapi_extra={"security": [{"BearerToken": []}]},
        responses={401: {"description": "No bearer token, or one that fails verification"}},
    )
    async def me(request: Request, tenant: CurrentTenant) -> dict[str, str]:
        """Needs a bearer token; its org_id claim must match the header when both are sent."""
        if not request.headers.get("authorization", "").lower().startswith("bearer "):
            raise HTTPException(401, "a bearer token is required")
        return {"tenant": tenant.id}

    @app.post(
        "/reports/query",
        responses={
            400: {"description": "Refused by the SQL guard (with its reason), or failed"},
            504: {"description": "The query ran over its time limit"},
        },
        response_model=ReportOut,
    )
    async def report(body: ReportIn, session: Session) -> ReportOut:
        """Untrusted SQL (a user's, a model's): refused with a reason, or run on own rows only."""
        # What the server refuses of the user's SQL is a 400 with its message
        # (GuardedQueryFailed), a timeout a 504 (GuardedQueryTimeout): run() maps them.
        rows = await reports.run(session, body.sql, max_rows=500, timeout_ms=2000)
        return ReportOut(rows=[dict(row) for row in rows])

    @app.websocket("/ws/tasks")
    async def task_events(websocket: WebSocket, tenant: CurrentTenant) -> None:
        await websocket.accept()
        queue = events.subscribe(tenant.id)
        try:
            while True:
                await websocket.send_json(await queue.get())
        except WebSocketDisconnect:
            pass
        finally:
            events.unsubscribe(tenant.id, queue)

    return app
