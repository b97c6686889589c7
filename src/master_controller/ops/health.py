"""The health gate of a deploy: the restarted service is the new release, answers, and a
real session reaches ``ready`` and shows a frame through the controller's viewer path.

The session part speaks to the controller as its clients do (an API key, the session API,
the viewer link, the viewer's WebSocket) and takes its frame with the same check a session's
readiness uses (:func:`~master_controller.viewing.readiness.non_blank_frame`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from master_controller.commands import run
from master_controller.errors import DeployError, MCError
from master_controller.viewing.readiness import non_blank_frame
from master_controller.web.paths import VIEWER_COOKIE

GATES = ("session", "liveness")
GATE_USER = "deploy-health-check"


@dataclass
class Gate:
    """Checks the service at ``url`` runs from ``release`` (a release dir) and is healthy."""

    url: str  # http://host:port of the controller, straight (not through a proxy)
    release: Path
    main_pid: Callable[[], int]  # the service's main process (0: none)
    cli: Path  # the release's master-controller, for a short-lived API key
    kind: str = "session"
    timeout: float = 180.0
    provider: str = "claude_code"

    def check(self) -> dict[str, float]:
        """Raise DeployError naming what failed; return the seconds each part took."""
        started = time.monotonic()
        deadline = started + self.timeout
        self._wait_live(deadline)
        timings = {"live": time.monotonic() - started}
        if self.kind == "session":
            self._session(deadline)
            timings["session"] = time.monotonic() - started
        return timings

    def _wait_live(self, deadline: float) -> None:
        last = "no answer yet"
        first = 0
        while time.monotonic() < deadline:
            pid = self.main_pid()
            first = first or pid
            if pid != first:  # systemd restarted it: the release's controller exited
                raise DeployError(f"the service's process {first} exited (now {pid or 'none'})")
            if pid:
                try:
                    cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
                except OSError:
                    cwd = None
                if cwd is not None and cwd != self.release.resolve():
                    raise DeployError(f"the service runs from {cwd}, not from {self.release}")
                try:
                    answer = httpx.get(f"{self.url}/health", trust_env=False, timeout=2)
                    if answer.status_code == 200:
                        return
                    last = f"/health answered {answer.status_code}"
                except httpx.HTTPError as exc:
                    last = f"/health: {exc!r}"
            else:
                last = "the service has no main process (it exited)"
            time.sleep(0.2)
        raise DeployError(f"the service did not come up healthy: {last}")

    def _session(self, deadline: float) -> None:
        name = f"deploy-gate-{secrets.token_hex(4)}"
        key = run([self.cli, "apikey", "create", name, "--scope", "sessions"]).strip()
        key = key.splitlines()[-1].strip()
        headers = {"Authorization": f"Bearer {key}"}
        session_id = None
        try:
            with httpx.Client(base_url=self.url, headers=headers, trust_env=False) as api:
                started = api.post(
                    "/api/auth/start",
                    json={"userId": GATE_USER, "provider": self.provider},
                    timeout=30,
                )
                if started.status_code != 200:
                    raise DeployError(f"a session could not start: {started.text[:300]}")
                session_id = str(started.json()["sessionId"])
                body = started.json()
                while body["status"] not in ("ready", "authenticating", "failed", "terminated"):
                    if time.monotonic() > deadline:
                        raise DeployError(f"the session stayed {body['status']}")
                    time.sleep(0.5)
                    body = api.get(f"/api/auth/session/{session_id}", timeout=10).json()
                if body["status"] in ("failed", "terminated"):
                    raise DeployError(f"the session {body['status']}: {body.get('reason')}")
                viewer_frame(self.url, body["novncURL"], session_id, deadline)
        except (httpx.HTTPError, KeyError, ValueError) as exc:
            raise DeployError(f"the session check failed: {exc!r}") from exc
        finally:
            if session_id is not None:
                with contextlib.suppress(httpx.HTTPError):  # else the reaper ends it
                    httpx.post(
                        f"{self.url}/api/auth/session/{session_id}/cancel",
                        headers=headers,
                        trust_env=False,
                        timeout=30,
                    )
            # a key that stays unrevoked was only ever in this process's memory
            with contextlib.suppress(MCError):
                run([self.cli, "apikey", "revoke", name])


def viewer_frame(url: str, novnc_url: str, session_id: str, deadline: float) -> None:
    """Open the viewer as a browser does (the link's page sets the viewer cookie, then the
    WebSocket with the controller's Origin) and wait for a non-blank frame."""
    link = httpx.URL(novnc_url)  # its host may be a reverse proxy's: ask the controller
    direct = httpx.URL(url).copy_with(path=link.path, query=link.query)
    page = httpx.get(direct, trust_env=False, timeout=10, follow_redirects=False)
    cookie = page.cookies.get(VIEWER_COOKIE)
    if not cookie:
        raise DeployError(f"the viewer page answered {page.status_code} without a cookie")
    socket_url = (
        url.replace("http://", "ws://", 1) + f"/api/auth/session/{session_id}/novnc/websock"
    )
    origin = f"{link.scheme}://{link.netloc.decode()}"  # the origin people open it at
    headers = {"Cookie": f"{VIEWER_COOKIE}={cookie}", "Origin": origin}
    try:
        asyncio.run(non_blank_frame(socket_url, None, deadline, headers))
    except MCError as exc:
        raise DeployError(f"the viewer showed no frame: {exc.reason}") from exc
