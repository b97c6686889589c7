"""Each CLI provider's login, started in a real guest (container runtime, golden image):
its terminal is on display :1 beside Chromium, and its sign-in URL is captured and open in
Chromium. The vendors' pages cannot load here (no network beyond the registries), so the
test stops at the URL: Chromium shows the egress proxy's refusal or a connection error."""

from __future__ import annotations

import json
import secrets
import time
from urllib.parse import urlsplit

import httpx
import pytest

from master_controller.agent_client import GuestAgent
from master_controller.errors import ProbeError
from master_controller.runtimes.base import GuestSecrets
from master_controller.runtimes.container import ContainerRuntime
from master_controller.viewing.readiness import agent_health, non_blank_frame, poll
from mc_agent.providers import get

pytestmark = pytest.mark.integration

EXPECTED_HOSTS = {
    "claude_code": "claude.com",
    "codex": "auth.openai.com",
    "gemini_cli": "accounts.google.com",
}


async def _events(url: str, token: str, until: str) -> list[str]:
    """Event kinds from the agent's server-sent event stream, up to ``until``."""
    kinds: list[str] = []
    headers = {"Authorization": f"Bearer {token}"}
    async with (
        httpx.AsyncClient(trust_env=False, timeout=10) as client,
        client.stream("GET", f"{url}/events?after=0", headers=headers) as stream,
    ):
        assert stream.headers["content-type"] == "text/event-stream"
        async for line in stream.aiter_lines():
            if line.startswith("data: "):
                kinds.append(json.loads(line[6:])["kind"])
                if kinds[-1] == until:
                    break
    return kinds


@pytest.mark.parametrize("provider", sorted(EXPECTED_HOSTS))
async def test_login_shows_its_terminal_and_opens_its_sign_in_url(
    provider: str, golden_image: str, container_runtime: ContainerRuntime
) -> None:
    runtime = container_runtime
    guest_secrets = GuestSecrets(vnc_password="clilogin", agent_token=secrets.token_hex(16))
    guest = await runtime.create(f"cli-{secrets.token_hex(3)}", golden_image, guest_secrets)
    try:
        await runtime.start(guest)
        endpoint = runtime.endpoint(guest)
        deadline = time.monotonic() + 60
        await poll(lambda: agent_health(endpoint.agent_url, guest_secrets.agent_token), deadline)
        agent = GuestAgent(runtime, guest)
        started = await agent.start_login(provider, {})
        assert started["provider"] == provider and started["state"] == "running"

        async def url_opened() -> dict[str, object]:
            login = await agent.login()
            if not login["opened_urls"]:
                raise ProbeError(
                    f"no URL opened yet; prompts answered: {login['prompts_answered']}"
                )
            return login

        login = await poll(url_opened, time.monotonic() + 90, interval=1.0)
        url = str(login["auth_url"])
        host = urlsplit(url).hostname or ""
        assert host == EXPECTED_HOSTS[provider] or host.endswith("." + EXPECTED_HOSTS[provider])
        assert any(host == d or host.endswith("." + d) for d in get(provider).domains)
        query = urlsplit(url).query
        assert "client_id=" in query and "redirect_uri=" in query  # an OAuth authorize URL

        async def both_windows() -> dict[str, object]:
            health = await agent_health(endpoint.agent_url, guest_secrets.agent_token)
            classes = {w["class"] for w in health["windows"]}
            titles = " ".join(w["title"] for w in health["windows"])
            if not ({"XTerm", "Chromium"} <= classes and EXPECTED_HOSTS[provider] in titles):
                raise ProbeError(f"windows: {health['windows']}")
            return health

        await poll(both_windows, time.monotonic() + 30, interval=0.5)
        frame = await non_blank_frame(endpoint.vnc_url, "clilogin", time.monotonic() + 10)
        assert not frame.is_blank()
        status = await agent.credential_status()
        assert status["valid"] is False and status["reason"] == "no credential file yet"
        async with httpx.AsyncClient(trust_env=False) as client:  # nothing to fetch yet
            answer = await client.post(
                f"{endpoint.agent_url}/credentials/fetch",
                headers={"Authorization": f"Bearer {guest_secrets.agent_token}"},
            )
        assert answer.status_code == 409 and "no valid credentials" in answer.json()["error"]
        kinds = await _events(endpoint.agent_url, guest_secrets.agent_token, until="auth url")
        assert kinds[0] == "login started" and "auth url" in kinds
    finally:
        await runtime.destroy(guest)
