"""The agent's HTTP API (standard library only; the guest has no other Python packages)."""

from __future__ import annotations

import hmac
import json
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from mc_agent import AGENT_PORT, browser, health

TOKEN_FILE = Path("/run/mc/agent-token")


class AgentHandler(BaseHTTPRequestHandler):
    server_version = "mc-agent/1"
    token: bytes = b""

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
        return scheme.lower() == "bearer" and hmac.compare_digest(value.encode(), self.token)

    def do_POST(self) -> None:
        if not self._authorized():
            self._send(HTTPStatus.UNAUTHORIZED, {"error": "missing or wrong agent token"})
            return
        if self.path != "/open-url":
            self._send(HTTPStatus.NOT_FOUND, {"error": f"no route {self.path}"})
            return
        try:
            length = int(self.headers.get("Content-Length", "0"))
            if length > browser.MAX_URL + 100:
                raise ValueError("request too large")
            body = json.loads(self.rfile.read(length) or b"{}")
            url = browser.open_url(str(body.get("url", "")))
        except ValueError as exc:
            self._send(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
            return
        self._send(HTTPStatus.OK, {"opened": url})

    def do_GET(self) -> None:
        if not self._authorized():
            self._send(HTTPStatus.UNAUTHORIZED, {"error": "missing or wrong agent token"})
        elif self.path == "/health":
            self._send(HTTPStatus.OK, health.report())
        else:
            self._send(HTTPStatus.NOT_FOUND, {"error": f"no route {self.path}"})

    def log_message(self, format: str, *args: Any) -> None:
        pass  # requests are not worth a journal line each


def serve(port: int = AGENT_PORT, token_file: Path = TOKEN_FILE) -> None:
    AgentHandler.token = token_file.read_text().strip().encode()
    httpd = ThreadingHTTPServer(("0.0.0.0", port), AgentHandler)
    httpd.serve_forever()
