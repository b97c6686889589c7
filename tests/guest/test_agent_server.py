"""The agent's HTTP API in-process: the wipe route, like every route, needs the guest's token
(the wipe itself is tried in a real guest: test_credentials_wipe.py)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import ThreadingHTTPServer

import httpx
import pytest

from mc_agent.server import AgentHandler

TOKEN = "t0ken-of-this-guest"


@pytest.fixture
def agent_url() -> Iterator[str]:
    AgentHandler.token = TOKEN.encode()
    server = ThreadingHTTPServer(("127.0.0.1", 0), AgentHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("header", [None, "Bearer wrong", f"Basic {TOKEN}", TOKEN])
def test_wipe_needs_the_token(agent_url: str, header: str | None) -> None:
    headers = {"Authorization": header} if header else {}
    with httpx.Client(trust_env=False, timeout=5) as client:
        answer = client.post(f"{agent_url}/credentials/wipe", headers=headers)
    assert answer.status_code == 401
    assert answer.json() == {"error": "missing or wrong agent token"}


def test_unknown_routes_echo_a_bounded_path(agent_url: str) -> None:
    with httpx.Client(trust_env=False, timeout=5) as client:
        answer = client.post(
            f"{agent_url}/{'x' * 5000}", headers={"Authorization": f"Bearer {TOKEN}"}
        )
    assert answer.status_code == 404 and len(answer.json()["error"]) < 120
