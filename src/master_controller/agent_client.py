"""The controller's client for a guest's agent (``mc_agent.server``): its HTTP API on the
guest's address, authenticated with the guest's own token.

The agent runs inside the guest, and the guest is hostile by assumption (its viewer may be
root there), so every exchange is bounded: the answer is streamed and refused past
:data:`MAX_RESPONSE_BYTES`, the whole exchange (connect, headers, body) has one deadline
(httpx's own timeouts are per read: an agent dribbling a byte every few seconds would
never trip them), and the answer must be a JSON object. Each failure is a
:class:`GuestAgentError` saying which bound was hit.
"""

from __future__ import annotations

import asyncio
import functools
import json
import ssl
from typing import Any

import httpx

from master_controller.errors import GuestAgentError
from master_controller.runtimes.base import GuestState, Runtime
from mc_agent.providers import MAX_CREDENTIAL_BYTES

# The largest real answer is /credentials/fetch: one credential file of at most
# MAX_CREDENTIAL_BYTES (256 KiB), which JSON escaping grows at most 3x (a UTF-8 "é" becomes
# "\u00e9"), plus a small status. 4x that is 1 MiB.
MAX_RESPONSE_BYTES = 4 * MAX_CREDENTIAL_BYTES
CALL_SECONDS = 10.0
# the agent's credential check runs the provider's status command (up to 20 s in the agent)
CREDENTIAL_CALL_SECONDS = 30.0
# the wipe ends the login's processes and restarts Chromium (systemctl, up to 30 s each)
WIPE_CALL_SECONDS = 60.0
MAX_CLIPBOARD_CHARS = 1024  # what the viewer copies out of a guest (it is hostile)
MAX_SCREEN_SIDE = 16384  # pixels: a screen size the guest may answer
ERROR_TEXT_CHARS = 300


async def request_json(
    method: str,
    url: str,
    headers: dict[str, str],
    body: dict[str, Any] | None = None,
    deadline: float = CALL_SECONDS,
    limit: int = MAX_RESPONSE_BYTES,
) -> tuple[int, dict[str, Any]]:
    """One bounded exchange with a guest's agent: (status, JSON object). Raises
    GuestAgentError when the agent is unreachable, answers more than ``limit`` bytes, takes
    longer than ``deadline`` seconds in all, or answers something that is not a JSON object
    (an error status with a non-JSON body gives ``{"error": <its text, shortened>}``)."""
    try:
        async with asyncio.timeout(deadline):
            status, data = await _exchange(method, url, headers, body, limit)
    except TimeoutError as exc:
        raise GuestAgentError(
            f"the guest's agent did not answer {method} {_path(url)} within {deadline:g} s"
        ) from exc
    except httpx.HTTPError as exc:
        raise GuestAgentError(f"the guest's agent is unreachable ({exc!r})") from exc
    try:
        answer = json.loads(data)
    except (ValueError, RecursionError) as exc:  # RecursionError: "[[[[..." nested deeply
        if status >= 400:
            return status, {"error": data[:ERROR_TEXT_CHARS].decode(errors="replace")}
        raise GuestAgentError(
            f"the guest's agent answered {_path(url)} with no JSON ({len(data)} bytes)"
        ) from exc
    if not isinstance(answer, dict):
        raise GuestAgentError(
            f"the guest's agent answered {_path(url)} with a JSON {type(answer).__name__}, "
            "not an object"
        )
    return status, answer


async def _exchange(
    method: str, url: str, headers: dict[str, str], body: dict[str, Any] | None, limit: int
) -> tuple[int, bytes]:
    async with (
        httpx.AsyncClient(trust_env=False, timeout=CALL_SECONDS, verify=tls_context()) as client,
        # identity: a compressed answer could inflate far past what was read
        client.stream(
            method, url, json=body, headers={**headers, "Accept-Encoding": "identity"}
        ) as response,
    ):
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:  # refused before reading any of it
            raise GuestAgentError(
                f"the guest's agent answered {_path(url)} with {declared} bytes (at most {limit})"
            )
        data = bytearray()
        async for chunk in response.aiter_raw():
            data += chunk
            if len(data) > limit:
                raise GuestAgentError(
                    f"the guest's agent answered {_path(url)} with more than {limit} bytes"
                )
        return response.status_code, bytes(data)


@functools.cache
def tls_context() -> ssl.SSLContext:
    """One TLS context for every exchange: httpx would build a new one per client, loading
    the CA bundle each time (~50 ms of the event loop per call to an agent, which speaks
    plain HTTP on the guest's link anyway)."""
    return ssl.create_default_context()


def _path(url: str) -> str:
    return httpx.URL(url).path


class GuestAgent:
    def __init__(self, runtime: Runtime, guest: GuestState, timeout: float = CALL_SECONDS) -> None:
        self.url = runtime.endpoint(guest).agent_url
        self.headers = {"Authorization": f"Bearer {guest.secrets.agent_token}"}
        self.timeout = timeout

    async def call(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        deadline: float | None = None,
    ) -> dict[str, Any]:
        """One bounded request (see :func:`request_json`); an error answer is a
        GuestAgentError saying so."""
        status, answer = await request_json(
            method, self.url + path, self.headers, body, deadline or self.timeout
        )
        if status >= 400:
            error = answer.get("error", answer)
            raise GuestAgentError(
                f"the guest's agent refused {path}: {str(error)[:ERROR_TEXT_CHARS]}"
            )
        return answer

    async def health(self) -> dict[str, Any]:
        return await self.call("GET", "/health")

    async def open_url(self, url: str) -> None:
        await self.call("POST", "/open-url", {"url": url})

    async def set_clipboard(self, text: str) -> None:
        """Put ``text`` on the guest display's clipboard (the viewer's paste)."""
        await self.call("POST", "/clipboard", {"text": text})

    async def get_clipboard(self) -> str:
        """The guest display's clipboard text, at most MAX_CLIPBOARD_CHARS."""
        text = (await self.call("GET", "/clipboard")).get("text")
        if not isinstance(text, str):
            raise GuestAgentError("the guest's agent answered /clipboard without text")
        return text[:MAX_CLIPBOARD_CHARS]

    async def set_display(self, width: int, height: int) -> tuple[int, int]:
        """Fit the guest's screen to ``width`` x ``height`` (the guest clamps it); the size
        it has after."""
        answer = await self.call("POST", "/display", {"width": width, "height": height})
        size = answer.get("width"), answer.get("height")
        match size:
            case (int(got_width), int(got_height)) if all(
                0 < v <= MAX_SCREEN_SIDE for v in (got_width, got_height)
            ):
                return got_width, got_height
        raise GuestAgentError(f"the guest's agent answered /display with {answer!r:.200}")

    async def start_login(self, provider: str, options: dict[str, str]) -> dict[str, Any]:
        return await self.call("POST", "/login", {"provider": provider, "options": options})

    async def login(self) -> dict[str, Any]:
        """The login's state: auth URL, prompts answered, credential status."""
        return await self.call("GET", "/login")

    async def credential_status(self) -> dict[str, Any]:
        return await self.call(
            "GET", "/credentials/status", deadline=max(self.timeout, CREDENTIAL_CALL_SECONDS)
        )

    async def fetch_credentials(self) -> dict[str, Any]:
        """The credential files; the agent hands them out once."""
        return await self.call(
            "POST", "/credentials/fetch", deadline=max(self.timeout, CREDENTIAL_CALL_SECONDS)
        )

    async def wipe_credentials(self) -> dict[str, Any]:
        """End the login and remove the credential files and the provider's browser
        session from the guest (``POST /credentials/wipe``); what the agent removed."""
        return await self.call(
            "POST", "/credentials/wipe", deadline=max(self.timeout, WIPE_CALL_SECONDS)
        )
