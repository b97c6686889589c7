"""The FastAPI application: wiring, error handling, health, metrics, static files."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from master_controller import __version__
from master_controller.auth import Tickets, load_secret
from master_controller.credentials import CredentialStore
from master_controller.errors import MCError
from master_controller.images.store import ImageStore
from master_controller.network.egress import EgressProxy
from master_controller.runtimes import best_runtime, get_runtime
from master_controller.runtimes.base import Runtime
from master_controller.sessions.manager import SessionManager
from master_controller.sessions.states import ACTIVE, State
from master_controller.settings import REPO_ROOT, Settings
from master_controller.store import repo
from master_controller.store.database import Database
from master_controller.vault import Vault
from master_controller.web import api, credentials_api, viewer
from master_controller.web.deps import Services, services
from master_controller.web.metrics import SESSIONS
from master_controller.web.proxy import ViewerRegistry
from master_controller.web.ratelimit import RateLimiter

STATIC = Path(__file__).parent / "static"
NOVNC = REPO_ROOT / "node_modules" / "@novnc" / "novnc"


class BodyLimit:
    """Refuse request bodies over ``limit`` bytes (413) before the app reads them."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._refuse(send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooLarge
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        body = f'{{"success":false,"error":"request body over {self.limit} bytes"}}'.encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


def create_app(settings: Settings, runtime: Runtime | None = None) -> FastAPI:
    """The app. ``runtime`` defaults to the setting (``auto``: the best this host can run)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        db = Database(settings.database)
        await asyncio.to_thread(db.migrate)
        chosen = runtime or (
            best_runtime(settings)
            if settings.runtime == "auto"
            else get_runtime(settings.runtime, settings)
        )
        tickets = Tickets(load_secret(settings.secret_key_path))
        viewers = ViewerRegistry()
        credentials = CredentialStore(db, Vault.open(settings))
        manager = SessionManager(settings, db, chosen, tickets, viewers, credentials)
        limiter = RateLimiter(settings.rate_limit_per_minute, settings.rate_limit_burst)
        app.state.services = Services(
            settings, db, chosen, tickets, viewers, manager, credentials, limiter
        )
        egress = EgressProxy(settings, manager.egress_policy)
        await egress.start()
        await manager.reconcile()
        manager.start_background()
        try:
            yield
        finally:
            await manager.shutdown()
            await egress.stop()
            await db.close()

    app = FastAPI(
        title="master-controller",
        version=__version__,
        summary="Disposable, isolated browsers for signing in to CLI tools.",
        lifespan=lifespan,
    )
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)

    @app.exception_handler(MCError)
    async def mc_error(request: Request, exc: MCError) -> JSONResponse:
        headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else None
        return JSONResponse(
            {"success": False, "error": exc.reason}, status_code=exc.status, headers=headers
        )

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [
            f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}"
            for e in exc.errors()
        ]
        return JSONResponse(
            {"success": False, "error": "; ".join(problems)[:1000]}, status_code=422
        )

    @app.get("/health", tags=["health"])
    async def health() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok", "version": __version__}

    @app.get("/api/health", tags=["health"])
    async def api_health(svc: Services = Depends(services)) -> dict[str, Any]:
        """Readiness: runtime, current image, database, capacity."""
        probe = type(svc.runtime).probe(svc.settings)
        try:
            async with svc.db.session() as db:
                await db.execute(text("SELECT 1"))
                counts = await repo.count_by_state(db)
            database = "ok"
        except Exception as exc:
            counts, database = {}, f"error: {exc}"
        active = sum(n for s, n in counts.items() if State(s) in ACTIVE)
        current = ImageStore(svc.settings.images_dir).current()
        healthy = probe.usable and current is not None and database == "ok"
        return {
            "status": "ok" if healthy else "degraded",
            "runtime": {"name": svc.runtime.name, "usable": probe.usable, "reason": probe.reason},
            "image": {"current": current},
            "database": database,
            "capacity": {
                "max": svc.settings.max_sessions,
                "active": active,
                "free": max(0, svc.settings.max_sessions - active),
            },
            "sessions": counts,
        }

    @app.get("/metrics", include_in_schema=False)
    async def metrics(svc: Services = Depends(services)) -> Response:
        async with svc.db.session() as db:
            counts = await repo.count_by_state(db)
        for state in State:
            SESSIONS.labels(state.value).set(counts.get(state.value, 0))
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    async def operator_page() -> FileResponse:
        return FileResponse(STATIC / "operator.html")

    app.include_router(api.router)
    app.include_router(credentials_api.router)
    app.include_router(viewer.router)
    app.mount("/static/app", StaticFiles(directory=STATIC), name="app-static")
    if NOVNC.is_dir():
        app.mount("/static/novnc", StaticFiles(directory=NOVNC), name="novnc")
    return app
