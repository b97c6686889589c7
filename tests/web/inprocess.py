"""The controller's app served in this process by a real uvicorn on a loopback port, for
tests of its HTTP side that need no guest: the viewer page, tickets, health, the logs. A
runtime double stands in for the guest runtime."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import uvicorn

from master_controller.auth import create_api_key
from master_controller.errors import GuestStartFailed, GuestStateError
from master_controller.runtimes.base import GuestSecrets, GuestState, GuestStatus, ProbeResult
from master_controller.runtimes.base import Runtime as RuntimeBase
from master_controller.sessions.bringup import ViewerPathCheck
from master_controller.settings import Settings
from master_controller.steps import StepLog
from master_controller.store.database import Database
from master_controller.web.app import create_app, forwarded_options
from master_controller.web.logs import LogFormat, log_config
from tests.servers import free_port
from tests.sessions.fake_runtime import FakeAgent, FakeRuntime, FakeViewerPath
from tests.sessions.harness import IMAGE_ID


class NoGuestRuntime(RuntimeBase):
    """A runtime that passes its probe after ``probe_seconds`` (blocking, as real probes
    do: they run commands and may boot a VM) and refuses to create guests."""

    name = "no-guest"
    probe_seconds: ClassVar[float] = 0.0
    probe_calls: ClassVar[list[float]] = []  # time.monotonic() when each probe started

    @classmethod
    def probe(cls, settings: Settings) -> ProbeResult:
        cls.probe_calls.append(time.monotonic())
        time.sleep(cls.probe_seconds)
        return ProbeResult(True, f"probed in {cls.probe_seconds}s")

    @classmethod
    def with_probe(cls, seconds: float) -> type[NoGuestRuntime]:
        """A subclass of its own (own call log) whose probe takes ``seconds``."""
        return type("SlowProbeRuntime", (cls,), {"probe_seconds": seconds, "probe_calls": []})

    async def create(
        self, guest_id: str, image_id: str, secrets: GuestSecrets, steps: StepLog | None = None
    ) -> GuestState:
        raise GuestStartFailed("allocate", "this runtime starts no guests")

    async def start(self, guest: GuestState, steps: StepLog | None = None) -> None:
        raise GuestStartFailed("boot", "this runtime starts no guests")

    async def destroy(self, guest: GuestState) -> None:
        return None

    async def hibernate(self, guest: GuestState) -> None:
        raise GuestStateError("this runtime has no guests")

    async def resume(self, guest: GuestState, steps: StepLog | None = None) -> None:
        raise GuestStateError("this runtime has no guests")

    def status(self, guest: GuestState) -> GuestStatus:
        return GuestStatus.DEAD


def app_settings(tmp_path: Path, database_url: str, **overrides: Any) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        database_url=database_url,
        secret_key_file=tmp_path / "secret.key",
        egress_port=0,
        **overrides,
    )


@asynccontextmanager
async def serving(
    settings: Settings,
    runtime: RuntimeBase,
    log_stream: Any = None,
    probe_interval: float = 60.0,
    viewer_path: ViewerPathCheck | None = None,
    log_format: LogFormat = "console",
) -> AsyncIterator[tuple[str, Any]]:
    """Serve the app on a free loopback port; yields its base URL and the app. Logging is
    configured as `serve` configures it (with ``log_stream`` for every handler, if given)
    and put back as it was afterwards."""
    config_dict = log_config(log_format)
    if log_stream is not None:
        for handler in config_dict["handlers"].values():
            handler["stream"] = log_stream
    app = create_app(settings, runtime, probe_interval=probe_interval, viewer_path=viewer_path)
    with _logging_restored():
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=free_port(),
            log_config=config_dict,
            lifespan="on",
            **forwarded_options(settings),
        )
        server = uvicorn.Server(config)
        task = asyncio.create_task(server.serve())
        try:
            while not server.started:
                if task.done():
                    task.result()
                    raise RuntimeError("the server stopped before it started")
                await asyncio.sleep(0.01)
            yield f"http://127.0.0.1:{config.port}", app
        finally:
            server.should_exit = True
            await task


@contextmanager
def _logging_restored() -> Iterator[None]:
    names = ["", "uvicorn", "uvicorn.access", "uvicorn.error", "master_controller"]
    saved = []
    for name in names:
        lg = logging.getLogger(name)
        saved.append((lg, list(lg.handlers), list(lg.filters), lg.level, lg.propagate))
    try:
        yield
    finally:
        for lg, handlers, filters, level, propagate in saved:
            lg.handlers[:] = handlers
            lg.filters[:] = filters
            lg.setLevel(level)
            lg.propagate = propagate


class LoopWatch:
    """Measures how late the event loop runs a 10 ms timer: a loop blocked by a request
    handler shows as a long gap."""

    def __init__(self) -> None:
        self.worst = 0.0
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> LoopWatch:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()

    async def _run(self) -> None:
        while True:
            before = time.monotonic()
            await asyncio.sleep(0.01)
            self.worst = max(self.worst, time.monotonic() - before - 0.01)


def umask_of_process() -> int:
    """The process umask, as the kernel reports it (reading it with os.umask would set it)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("Umask:"):
            return int(line.split()[1], 8)
    raise RuntimeError("no Umask in /proc/self/status")


@dataclass
class FakeGuestController:
    """The controller's app served here over a fake runtime, agent and viewer path (the
    session core, database and vault are real): its URL, the app, the fakes, and API keys
    by name."""

    base: str
    app: Any
    agent: FakeAgent
    runtime: FakeRuntime
    keys: dict[str, str]


@asynccontextmanager
async def fake_guest_controller(
    root: Path,
    keys: dict[str, tuple[str, ...]],
    log_stream: Any = None,
    log_format: LogFormat = "console",
    **overrides: Any,
) -> AsyncIterator[FakeGuestController]:
    """Serve the app on a fresh database under ``root``, with the fake image promoted and
    the API keys ``keys`` (name -> scopes) made; logging as ``serving`` sets it up."""
    database_url = f"sqlite:///{root / 'mc.db'}"
    settings = app_settings(root, database_url, **overrides)
    settings.images_dir.mkdir(parents=True)
    history = {"history": [{"id": IMAGE_ID, "at": "2024-01-01T00:00:00+00:00"}]}
    (settings.images_dir / "promotions.json").write_text(json.dumps(history))
    db = Database(database_url)
    db.migrate()
    made = {}
    async with db.session() as session:
        for name, scopes in keys.items():
            made[name] = await create_api_key(session, name, scopes)
    await db.close()
    with FakeAgent() as agent:
        runtime = FakeRuntime(settings, agent)
        async with serving(
            settings, runtime, log_stream, viewer_path=FakeViewerPath(), log_format=log_format
        ) as (base, app):
            yield FakeGuestController(base, app, agent, runtime, made)
