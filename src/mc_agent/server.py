"""The agent's HTTP API (standard library only; the guest has no other Python packages).

Every route needs the guest's token as a bearer token:

- ``GET /health``: each service with its state and version, the windows on :1, boot id
- ``POST /open-url`` ``{"url"}``: open a URL in Chromium
- ``POST /clipboard`` ``{"text"}``: make it the display's clipboard (a viewer's paste)
- ``GET /clipboard``: the display's clipboard text (a viewer's copy, where the controller's
  setting allows it), at most 1,024 characters
- ``POST /display`` ``{"width", "height"}``: fit the screen to a viewer's window (clamped to
  800x600 .. 1920x1200); answers the size it has after
- ``POST /login`` ``{"provider", "options"}``: start a provider's login in a terminal on :1
- ``GET /login``: its state, the captured auth URL, prompts answered, credential status
- ``GET /credentials/status``: whether valid credentials are there (and why not)
- ``POST /credentials/fetch``: the credential files, once (then 410); only the provider's
  own files (names from its list), each at most ``MAX_CREDENTIAL_BYTES``
- ``POST /credentials/wipe``: end the login (tmux, the CLI, the xterm: every process of the
  browser user the agent started), remove everything in the browser user's home (the
  credential files, the CLIs' state, the Chromium profile and caches) and in
  ``/run/mc/login``, and restart Chromium on a fresh profile. The controller calls it right
  after it has the credentials. Idempotent; answers ``{"provider", "processes_killed",
  "credential_files_removed", "removed", "removed_count", "chromium"}`` (see
  :func:`mc_agent.wipe.wipe`)
- ``GET /events?after=N``: a server-sent event stream of what happened

Answers are bounded (URL lists, reasons, window titles): the controller checks them again,
but the agent never sends more than its own limits.
"""

from __future__ import annotations

import hmac
import json
import subprocess
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from mc_agent import AGENT_PORT, browser, display, health, providers
from mc_agent.events import EventLog
from mc_agent.login import Account, Login
from mc_agent.userdir import UnsafePath
from mc_agent.wipe import wipe

TOKEN_FILE = Path("/run/mc/agent-token")
MAX_BODY = 16 * 1024
MAX_ERROR = 300
STREAM_SECONDS = 300.0


class Agent:
    """What the routes share: the event log and the current login."""

    def __init__(self) -> None:
        self.events = EventLog()
        self.login: Login | None = None
        # a login starting and a wipe must not interleave (the wipe would miss its processes)
        self._changing = threading.Lock()

    def start_login(self, provider: str, options: dict[str, str]) -> Login:
        with self._changing:
            login = Login(providers.get(provider), options, self.events)
            if self.login is not None:
                self.login.stop()
            self.login = login
            try:
                login.start()
            except Exception:
                login.state = "failed"
                raise
            return login

    def wipe(self) -> dict[str, Any]:
        with self._changing:
            login = self.login
            account = login.account if login is not None else Account.of()
            result = wipe(login, account)
        self.events.add(
            "credentials wiped",
            {
                "credential_files": result["credential_files_removed"],
                "removed_count": result["removed_count"],
                "chromium": result["chromium"],
            },
        )
        return result


class AgentHandler(BaseHTTPRequestHandler):
    server_version = "mc-agent/1"
    protocol_version = "HTTP/1.1"
    token: bytes = b""
    agent = Agent()

    def _send(self, status: HTTPStatus, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _authorized(self) -> bool:
        header = self.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        ok = scheme.lower() == "bearer" and hmac.compare_digest(value.encode(), self.token)
        if not ok:
            self._send(HTTPStatus.UNAUTHORIZED, {"error": "missing or wrong agent token"})
        return ok

    def _body(self) -> dict[str, Any]:
        length = int(self.headers.get("Content-Length", "0") or 0)
        if length > MAX_BODY:
            raise ValueError("request too large")
        body = json.loads(self.rfile.read(length) or b"{}")
        if not isinstance(body, dict):
            raise ValueError("the body must be a JSON object")
        return body

    def do_POST(self) -> None:
        if not self._authorized():
            return
        path = urlsplit(self.path).path
        try:
            body = self._body()
            if path == "/open-url":
                self._send(HTTPStatus.OK, {"opened": browser.open_url(str(body.get("url", "")))})
            elif path == "/clipboard":
                text = body.get("text")
                if not isinstance(text, str):
                    raise ValueError("text must be a string")
                self._send(HTTPStatus.OK, {"characters": browser.set_clipboard(text)})
            elif path == "/display":
                self._send(HTTPStatus.OK, display.set_size(body.get("width"), body.get("height")))
            elif path == "/login":
                options = body.get("options") or {}
                if not isinstance(options, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in options.items()
                ):
                    raise ValueError("options must be an object of strings")
                login = self.agent.start_login(str(body.get("provider", "")), options)
                self._send(HTTPStatus.ACCEPTED, login.describe())
            elif path == "/credentials/fetch":
                current = self._login()
                if current is None:
                    return
                fetched = current.fetch()
                if fetched is None:
                    self._send(HTTPStatus.GONE, {"error": "the credentials were fetched already"})
                else:
                    self._send(HTTPStatus.OK, fetched)
            elif path == "/credentials/wipe":
                self._send(HTTPStatus.OK, self.agent.wipe())
            else:
                self._send(HTTPStatus.NOT_FOUND, {"error": f"no route {path[:100]}"})
        except providers.ProviderError as exc:
            self._send(
                HTTPStatus.CONFLICT if path == "/credentials/fetch" else HTTPStatus.BAD_REQUEST,
                {"error": str(exc)[:MAX_ERROR]},
            )
        except (ValueError, json.JSONDecodeError) as exc:
            self._send(HTTPStatus.BAD_REQUEST, {"error": str(exc)[:MAX_ERROR]})
        except (OSError, subprocess.SubprocessError, UnsafePath) as exc:
            error = f"{path} failed: {exc}"[:MAX_ERROR]
            self._send(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": error})

    def _login(self) -> Login | None:
        if self.agent.login is None:
            self._send(HTTPStatus.NOT_FOUND, {"error": "no login has been started"})
        return self.agent.login

    def do_GET(self) -> None:
        if not self._authorized():
            return
        parts = urlsplit(self.path)
        if parts.path == "/health":
            self._send(HTTPStatus.OK, health.report())
        elif parts.path == "/clipboard":
            try:
                self._send(HTTPStatus.OK, {"text": browser.get_clipboard()})
            except (OSError, subprocess.SubprocessError) as exc:
                self._send(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"clipboard: {exc}"[:300]})
        elif parts.path == "/login":
            if (login := self._login()) is not None:
                self._send(HTTPStatus.OK, login.describe())
        elif parts.path == "/credentials/status":
            if (login := self._login()) is not None:
                status = login.check_credentials()
                self._send(HTTPStatus.OK, {"provider": login.provider.name, **status.as_dict()})
        elif parts.path == "/events":
            after = parse_qs(parts.query).get("after", ["0"])[0]
            self._stream(int(after) if after.isdigit() else 0)
        else:
            self._send(HTTPStatus.NOT_FOUND, {"error": f"no route {parts.path[:100]}"})

    def _stream(self, seq: int) -> None:
        """Server-sent events, from ``seq`` on, until the client goes or time is up."""
        import time

        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-store")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        deadline = time.monotonic() + STREAM_SECONDS
        try:
            while time.monotonic() < deadline:
                events = self.agent.events.since(seq, timeout=15)
                if not events:
                    self.wfile.write(b": keep-alive\n\n")
                for event in events:
                    seq = event["seq"]
                    self.wfile.write(f"id: {seq}\ndata: {json.dumps(event)}\n\n".encode())
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            return

    def log_message(self, format: str, *args: Any) -> None:
        pass  # requests are not worth a journal line each


def serve(port: int = AGENT_PORT, token_file: Path = TOKEN_FILE) -> None:
    AgentHandler.token = token_file.read_text().strip().encode()
    httpd = ThreadingHTTPServer(("0.0.0.0", port), AgentHandler)
    httpd.daemon_threads = True
    httpd.serve_forever()
