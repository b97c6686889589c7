"""The controller's agent client against a hostile agent on loopback (the same hostile
servers a real guest runs in tests/web/test_hostile_guest.py): a 100 MB answer, with or
without a length, a gzip bomb, a slowloris, answers of the wrong shape. Each one fails
fast with a GuestAgentError saying why, and nothing big is ever held in memory."""

from __future__ import annotations

import time
import tracemalloc

import pytest

from master_controller.agent_client import MAX_RESPONSE_BYTES, GuestAgent
from master_controller.errors import GuestAgentError
from master_controller.runtimes.base import Endpoint, GuestSecrets, GuestState
from tests.sessions import hostile


class LoopbackRuntime:
    """What GuestAgent asks of a runtime: where the guest's agent listens."""

    def __init__(self, port: int) -> None:
        self.port = port

    def endpoint(self, guest: GuestState) -> Endpoint:
        return Endpoint("127.0.0.1", agent_port=self.port)


def guest() -> GuestState:
    return GuestState(
        guest_id="hostile",
        runtime="container",
        image_id="none",
        secrets=GuestSecrets(vnc_password="pw", agent_token="token"),
    )


async def refused(mode: str, deadline: float = 5.0, seconds: float = 0.2) -> tuple[str, float]:
    """Ask the hostile agent for /login; the GuestAgentError's reason and the time taken."""
    with hostile.running(mode, seconds) as port:
        agent = GuestAgent(LoopbackRuntime(port), guest(), timeout=deadline)  # type: ignore[arg-type]
        started = time.monotonic()
        with pytest.raises(GuestAgentError) as failed:
            await agent.login()
        return failed.value.reason, time.monotonic() - started


@pytest.mark.parametrize("mode", ["agent-huge", "agent-huge-chunked"])
async def test_a_100mb_answer_is_cut_at_the_cap(mode: str) -> None:
    tracemalloc.start()
    try:
        reason, took = await refused(mode)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert f"at most {MAX_RESPONSE_BYTES}" in reason or f"more than {MAX_RESPONSE_BYTES}" in reason
    assert "/login" in reason
    assert peak < 4 * MAX_RESPONSE_BYTES, f"{peak} bytes allocated for a refused answer"
    assert took < 5


async def test_a_gzip_bomb_is_never_inflated() -> None:
    tracemalloc.start()
    try:
        reason, _ = await refused("agent-gzip")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "no JSON" in reason
    assert peak < 4 * MAX_RESPONSE_BYTES


async def test_a_slowloris_agent_hits_the_deadline() -> None:
    """A byte every 0.2 s never trips a per-read timeout; the call's deadline ends it."""
    reason, took = await refused("agent-dribble", deadline=1.0, seconds=0.2)
    assert "did not answer GET /login within 1 s" in reason
    assert 1.0 <= took < 2.0


@pytest.mark.parametrize(
    ("mode", "words"), [("agent-list", "a JSON list, not an object"), ("agent-deep", "no JSON")]
)
async def test_an_answer_of_the_wrong_shape_is_refused(mode: str, words: str) -> None:
    reason, _ = await refused(mode)
    assert words in reason


async def test_nothing_listening_is_unreachable() -> None:
    with hostile.running("agent-list") as port:
        pass
    agent = GuestAgent(LoopbackRuntime(port), guest(), timeout=2)  # type: ignore[arg-type]
    with pytest.raises(GuestAgentError, match="unreachable"):
        await agent.health()
