"""The FastAPI application: wiring, error handling, health, metrics, static files; and
what the controller process guarantees while it runs: umask 077 and a 0700 data dir (files
holding secrets are born 0600), viewer tickets redacted from every log line, health answers
from a probe cache (a probe never runs in a request)."""

from __future__ import annotations

import asyncio
import logging
import os
import stat
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.gzip import GZipMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from master_controller import __version__
from master_controller.agent_client import tls_context
from master_controller.auth import TicketRedaction, Tickets, load_secret
from master_controller.credentials import CredentialStore
from master_controller.errors import ConfigError, MCError
from master_controller.instance import claim
from master_controller.looplag import LoopLagMonitor
from master_controller.metrics import SESSIONS
from master_controller.network.egress import EgressProxy
from master_controller.network.identities import EgressIdentities
from master_controller.runtimes import best_runtime, get_runtime
from master_controller.runtimes.base import ProbeCache, Runtime
from master_controller.sessions.bringup import ViewerPathCheck
from master_controller.sessions.service import SessionService
from master_controller.sessions.states import State
from master_controller.settings import REPO_ROOT, Settings
from master_controller.store import repo
from master_controller.store.database import Database
from master_controller.vault import Vault
from master_controller.viewing.readiness import ViewerPath
from master_controller.viewing.relay import ViewerRegistry
from master_controller.web import api, credentials_api, system_api, users_api, viewer
from master_controller.web.deps import Services, services
from master_controller.web.logs import log_config as log_config  # its old home, re-exported
from master_controller.web.ratelimit import RateLimiter
from master_controller.web.scrape import sample_host

STATIC = Path(__file__).parent / "static"
NOVNC = REPO_ROOT / "node_modules" / "@novnc" / "novnc"
UMASK = 0o077
PROBE_INTERVAL = 60.0  # seconds between background runtime probes
# loggers whose records may carry a request's path (and so a viewer ticket)
REDACTED_LOGGERS = ("uvicorn", "uvicorn.access", "uvicorn.error", "master_controller")


def forwarded_options(settings: Settings) -> dict[str, Any]:
    """uvicorn's options for X-Forwarded-For and -Proto: believed from the reverse proxies
    in ``forwarded_allow_ips`` alone. (uvicorn's own default believes any process on
    loopback; without a proxy in front, nothing is believed.)"""
    return {
        "proxy_headers": bool(settings.forwarded_allow_ips),
        "forwarded_allow_ips": list(settings.forwarded_allow_ips),
    }


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


def create_app(
    settings: Settings,
    runtime: Runtime | None = None,
    probe_interval: float = PROBE_INTERVAL,
    viewer_path: ViewerPathCheck | None = None,
) -> FastAPI:
    """The app. ``runtime`` defaults to the setting (``auto``: the best this host can run),
    ``viewer_path`` (how a guest is found ready) to the real path the relay takes (its VNC).
    While it runs (its lifespan) the process umask is 077; the one before is restored."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        refuse_shared_folder(settings.data_dir)  # before the lock file is made in it
        controller = claim(settings)  # then: a second controller stops here, touching nothing
        previous_umask = os.umask(UMASK)
        try:
            async with _services(app) as probes:
                app.state.probes = probes
                yield
        finally:
            os.umask(previous_umask)
            controller.release()

    @asynccontextmanager
    async def _services(app: FastAPI) -> AsyncIterator[ProbeCache]:
        protect_data_dir(settings.data_dir)
        redact_logs()
        async with AsyncExitStack() as stack:
            # first: a start-up that blocks the loop shows in the lag metrics too
            lag = LoopLagMonitor()
            lag.start()
            stack.push_async_callback(lag.stop)
            db = Database(settings.database)
            stack.push_async_callback(db.close)
            await asyncio.to_thread(db.migrate)
            chosen = runtime or (
                best_runtime(settings)
                if settings.runtime == "auto"
                else get_runtime(settings.runtime, settings)
            )
            probes = ProbeCache(type(chosen), settings, probe_interval)
            await probes.refresh()  # before serving: health has an answer from the start
            # built once, off the loop: the first agent call would otherwise load the CA
            # bundle (~50 ms) while viewers wait
            await asyncio.to_thread(tls_context)
            probes.start()
            stack.push_async_callback(probes.stop)
            tickets = Tickets(load_secret(settings.secret_key_path))
            viewers = ViewerRegistry()
            credentials = CredentialStore(db, Vault.open(settings))
            egress = EgressProxy(settings)
            identities = EgressIdentities(settings, db, credentials)
            await identities.count_users()
            manager = SessionService(
                settings,
                db,
                chosen,
                viewers,
                credentials,
                viewer_path or ViewerPath(chosen),
                egress=egress,
                identities=identities,
            )
            limiter = RateLimiter(settings.rate_limit_per_minute, settings.rate_limit_burst)
            app.state.services = Services(
                settings, db, chosen, tickets, viewers, manager, credentials, limiter
            )
            await egress.start()
            stack.push_async_callback(egress.stop)
            stack.push_async_callback(manager.shutdown)
            await manager.reconcile()
            manager.start_background()
            yield probes

    app = FastAPI(
        title="master-controller",
        version=__version__,
        summary="Disposable, isolated browsers for signing in to CLI tools.",
        lifespan=lifespan,
    )
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    # the viewer's page loads ~50 script modules (noVNC's), 600 KB as they are
    app.add_middleware(GZipMiddleware, minimum_size=1024)

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

    @app.get("/metrics", include_in_schema=False)
    async def metrics(svc: Services = Depends(services)) -> Response:
        async with svc.db.session() as db:
            counts = await repo.count_by_state(db)
        for state in State:
            SESSIONS.labels(state.value).set(counts.get(state.value, 0))
        await asyncio.to_thread(sample_host, svc.settings)
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    async def operator_page() -> FileResponse:
        return FileResponse(STATIC / "operator.html")

    app.include_router(system_api.router)
    app.include_router(api.router)
    app.include_router(users_api.router)
    app.include_router(credentials_api.router)
    app.include_router(viewer.router)
    app.mount("/static/app", StaticFiles(directory=STATIC), name="app-static")
    if NOVNC.is_dir():
        app.mount("/static/novnc", StaticFiles(directory=NOVNC), name="novnc")
    return app


# --- what the controller process guarantees ---------------------------------------------------

# Folders that hold nothing secret: the content-addressed images (guests read them through
# their own mounts) and the build cache.
NOT_SECRET = ("images", "cache")
# Folders a data dir must never be (nor any sticky folder like /tmp): tightening them would
# break the host.
SHARED_FOLDERS = {"/", "/var", "/var/lib", "/home", "/root", "/usr", "/etc", "/opt", "/srv"}


def refuse_shared_folder(data_dir: Path) -> None:
    """A data dir must be the controller's own: never a system folder nor a sticky one like
    /tmp (tightening it, or leaving a lock file in it, would touch what others share)."""
    resolved = data_dir.resolve()
    if str(resolved) in SHARED_FOLDERS or (
        resolved.exists() and resolved.stat().st_mode & stat.S_ISVTX
    ):
        raise ConfigError(f"data_dir {data_dir} is a shared folder: give the controller its own")


def protect_data_dir(data_dir: Path) -> None:
    """The data dir 0700 (created so if missing). Also narrows what an older version or a
    wider umask left: the folders holding guests and leases, each guest's folder, and the
    plain files in them lose every group and other permission. Guests' own file systems
    (their disk layers inside their folders) are left as the guest made them: the 0700
    folders around them are what keeps them private."""
    refuse_shared_folder(data_dir)
    resolved = data_dir.resolve()
    resolved.mkdir(mode=0o700, parents=True, exist_ok=True)
    _narrow(resolved)
    for child in resolved.iterdir():
        if child.name in NOT_SECRET or child.is_symlink():
            continue
        _narrow(child)
        if child.is_dir():
            for grandchild in child.iterdir():
                if grandchild.is_symlink():
                    continue
                _narrow(grandchild)
                if grandchild.is_dir() and child.name == "guests":
                    for entry in grandchild.iterdir():
                        if entry.is_file() and not entry.is_symlink():
                            _narrow(entry)


def _narrow(path: Path) -> None:
    mode = stat.S_IMODE(path.lstat().st_mode)
    if mode & 0o077:
        path.chmod(mode & 0o700)


def redact_logs() -> None:
    """Redact tickets from what the loggers that may see a request path log, and from every
    handler they (and the root logger) write to, whoever configured them. Idempotent."""
    loggers = [logging.getLogger(name) for name in REDACTED_LOGGERS]
    for target in [*loggers, *(h for lg in [*loggers, logging.getLogger()] for h in lg.handlers)]:
        if not any(isinstance(f, TicketRedaction) for f in target.filters):
            target.addFilter(TicketRedaction())
