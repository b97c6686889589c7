"""Real servers for tests: PostgreSQL (Debian's cluster) and the controller itself."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from master_controller.runtimes.base import Runtime
from master_controller.viewing.readiness import non_blank_frame
from master_controller.viewing.rfb import Frame
from master_controller.web.paths import VIEWER_COOKIE

PG_SOCKET_DIR = "/var/run/postgresql"


def _run(argv: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=120)


@contextmanager
def postgresql_server() -> Iterator[str]:
    """A real PostgreSQL: Debian's cluster, started if it is not running (and then stopped
    again afterwards). Yields a URL prefix; add a database name."""
    clusters = _run(["pg_lsclusters", "--no-header"]).stdout.split()
    if len(clusters) < 4:
        raise RuntimeError("no PostgreSQL cluster (install postgresql)")
    version, name, status = clusters[0], clusters[1], clusters[3]
    started = False
    if status != "online":
        _run(["pg_ctlcluster", version, name, "start"])
        started = True
    _run(
        [
            "runuser",
            "-u",
            "postgres",
            "--",
            "psql",
            "-qc",
            "DO $$BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'root') "
            "THEN CREATE ROLE root SUPERUSER LOGIN; END IF; END$$;",
        ]
    )
    try:
        yield f"postgresql+psycopg:///{{db}}?host={PG_SOCKET_DIR}"
    finally:
        if started:
            _run(["pg_ctlcluster", version, name, "stop"], check=False)


@contextmanager
def postgresql_database(server_url: str, name: str) -> Iterator[str]:
    _run(["dropdb", "--if-exists", "-h", PG_SOCKET_DIR, name])
    _run(["createdb", "-h", PG_SOCKET_DIR, name])
    try:
        yield server_url.format(db=name)
    finally:
        _run(["dropdb", "--if-exists", "--force", "-h", PG_SOCKET_DIR, name], check=False)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Controller:
    """A `master-controller serve` process with its own database and API keys."""

    env: dict[str, str]
    url: str
    keys: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None
    log: Path | None = None

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "master_controller.cli", *args],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=120,
        )

    def request(
        self, method: str, path: str, key: str | None = "alice", **kw: Any
    ) -> httpx.Response:
        headers = dict(kw.pop("headers", {}))
        if key is not None:
            headers["Authorization"] = f"Bearer {self.keys[key]}"
        return httpx.request(
            method, self.url + path, headers=headers, trust_env=False, timeout=30, **kw
        )

    def start(self) -> None:
        """Run `serve` (again, after :meth:`kill`: same database, same data dir)."""
        assert self.log is not None
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "master_controller.cli", "serve"],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(self.url + "/health", trust_env=False, timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("controller did not start:\n" + self.log.read_text()[-3000:])
            time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL the controller, as a crash would: no shutdown code runs."""
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    def ready_session(self, user: str, provider: str = "codex") -> str:
        """Start a session and wait until it is ready; returns its id."""
        answer = self.request(
            "POST", "/api/auth/start", json={"userId": user, "provider": provider}
        )
        assert answer.status_code == 200, answer.text
        session_id = str(answer.json()["sessionId"])
        body = self.wait_for(session_id, {"ready", "failed"})
        assert body["status"] == "ready", body["reason"]
        return session_id

    def viewer(self, session_id: str) -> tuple[str, dict[str, str]]:
        """What a viewer connects with: the session's WebSocket URL, and the headers of a
        browser that traded a fresh ticket for the viewer cookie on the viewer page."""
        novnc = self.request("GET", f"/api/auth/session/{session_id}").json()["novncURL"]
        page = httpx.get(novnc, trust_env=False, timeout=10, follow_redirects=False)
        cookie = page.cookies.get(VIEWER_COOKIE)
        assert cookie, page.status_code
        url = self.url.replace("http://", "ws://") + f"/api/auth/session/{session_id}/novnc/websock"
        return url, {"Cookie": f"{VIEWER_COOKIE}={cookie}", "Origin": self.url}

    def frame(self, session_id: str) -> Frame:
        """A non-blank frame as a viewer gets it, through the controller's proxy."""
        url, headers = self.viewer(session_id)
        return asyncio.run(non_blank_frame(url, None, time.monotonic() + 30, headers))

    def wait_for(self, session_id: str, states: set[str], timeout: float = 90) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            body = self.request("GET", f"/api/auth/session/{session_id}").json()
            if body["status"] in states or time.monotonic() > deadline:
                return dict(body)
            time.sleep(0.2)


@contextmanager
def controller(
    data_dir: Path, database_url: str, work: Path, **settings: str
) -> Iterator[Controller]:
    port = free_port()
    env = {
        **os.environ,
        "MC_DATA_DIR": str(data_dir),
        "MC_DATABASE_URL": database_url,
        "MC_PORT": str(port),
        "MC_HOST": "127.0.0.1",
        "MC_SECRET_KEY_FILE": str(work / "secret.key"),
        "MC_CONFIG": str(work / "none.toml"),
        # sessions stop at ready unless a test is about the sign-in itself
        "MC_AUTO_LOGIN": "false",
        "MC_EGRESS_PORT": str(free_port()),
        **{f"MC_{k.upper()}": v for k, v in settings.items()},
    }
    ctl = Controller(env=env, url=f"http://127.0.0.1:{port}")
    for name, scope in (("alice", "sessions"), ("bob", "sessions"), ("ops", "admin")):
        done = ctl.cli("apikey", "create", name, "--scope", scope)
        assert done.returncode == 0, done.stderr
        ctl.keys[name] = done.stdout.strip()
    ctl.log = work / "controller.log"
    ctl.log.write_bytes(b"")
    try:
        ctl.start()
        yield ctl
    finally:
        # end every session this controller started, so no guest outlives the test
        try:
            sessions = ctl.request("GET", "/api/auth/sessions", key="ops").json()
            for s in sessions:
                if s["status"] not in ("terminated", "failed"):
                    ctl.request("POST", f"/api/auth/session/{s['sessionId']}/cancel", key="ops")
        except httpx.HTTPError:
            pass
        if ctl.process is not None and ctl.process.poll() is None:
            ctl.process.send_signal(signal.SIGTERM)
            try:
                ctl.process.wait(20)
            except subprocess.TimeoutExpired:
                ctl.process.kill()
                ctl.process.wait()


def same_share(a: Frame, b: Frame) -> float:
    """Share of sampled pixels that are equal in both frames."""
    samples = range(0, len(a.pixels), 4 * 97)
    return sum(a.pixels[i : i + 3] == b.pixels[i : i + 3] for i in samples) / len(samples)


def guest_health(runtime: Runtime, guest_id: str) -> dict[str, Any]:
    """The guest agent's health report, asked synchronously (for tests whose thread
    already runs an event loop, Playwright's)."""
    guest = runtime.load(guest_id)
    answer = httpx.get(
        runtime.endpoint(guest).agent_url + "/health",
        headers={"Authorization": f"Bearer {guest.secrets.agent_token}"},
        trust_env=False,
        timeout=10,
    )
    return dict(answer.json())


def guest_display(runtime: Runtime, guest_id: str, *argv: str) -> str:
    """Run an X client (xdotool, xrandr...) on a container guest's display :1 as its browser
    user (nsenter into the guest); its output."""
    leader = str(runtime.load(guest_id).resources["leader"]["pid"])
    as_browser = ["nsenter", "-t", leader, "-a", "runuser", "-u", "browser", "--"]
    done = subprocess.run(
        [*as_browser, "env", "DISPLAY=:1", *argv],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def chromium_geometry(runtime: Runtime, guest_id: str) -> list[str]:
    """The size (WxH) of each visible Chromium window on a container guest's display."""
    windows = guest_display(
        runtime, guest_id, "xdotool", "search", "--onlyvisible", "--class", "chromium"
    )
    return [
        guest_display(runtime, guest_id, "xdotool", "getwindowgeometry", w)
        .split("Geometry: ")[1]
        .strip()
        for w in windows.split()
    ]


def have_postgresql() -> bool:
    return shutil.which("pg_lsclusters") is not None and shutil.which("createdb") is not None
