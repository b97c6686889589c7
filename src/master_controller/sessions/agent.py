"""The controller's client for a guest's agent (``mc_agent.server``): its HTTP API on the
guest's address, authenticated with the guest's own token."""

from __future__ import annotations

from typing import Any

import httpx

from master_controller.errors import GuestAgentError
from master_controller.runtimes.base import GuestState, Runtime


class GuestAgent:
    def __init__(self, runtime: Runtime, guest: GuestState, timeout: float = 10.0) -> None:
        self.url = runtime.endpoint(guest).agent_url
        self.headers = {"Authorization": f"Bearer {guest.secrets.agent_token}"}
        self.timeout = timeout

    async def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """One request; a transport failure or an error answer is a GuestAgentError saying so."""
        try:
            async with httpx.AsyncClient(trust_env=False, timeout=self.timeout) as client:
                response = await client.request(
                    method, self.url + path, json=body, headers=self.headers
                )
        except httpx.HTTPError as exc:
            raise GuestAgentError(f"the guest's agent is unreachable ({exc!r})") from exc
        if response.status_code >= 400:
            try:
                error = response.json().get("error", response.text)
            except ValueError:
                error = response.text
            raise GuestAgentError(f"the guest's agent refused {path}: {str(error)[:300]}")
        try:
            return response.json()
        except ValueError as exc:
            raise GuestAgentError(f"the guest's agent answered {path} with no JSON") from exc

    async def health(self) -> dict[str, Any]:
        result: dict[str, Any] = await self.call("GET", "/health")
        return result

    async def open_url(self, url: str) -> None:
        await self.call("POST", "/open-url", {"url": url})

    async def start_login(self, provider: str, options: dict[str, str]) -> dict[str, Any]:
        result: dict[str, Any] = await self.call(
            "POST", "/login", {"provider": provider, "options": options}
        )
        return result

    async def login(self) -> dict[str, Any]:
        """The login's state: auth URL, prompts answered, credential status."""
        result: dict[str, Any] = await self.call("GET", "/login")
        return result

    async def credential_status(self) -> dict[str, Any]:
        result: dict[str, Any] = await self.call("GET", "/credentials/status")
        return result

    async def fetch_credentials(self) -> dict[str, Any]:
        """The credential files; the agent hands them out once."""
        result: dict[str, Any] = await self.call("POST", "/credentials/fetch")
        return result
