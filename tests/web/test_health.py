"""/api/health, attacked as any network peer can (it needs no key): a burst of requests
while the runtime's probe is slow (a probe may boot a VM for up to 20 s). Every answer
comes from the probe cache, none waits for a probe, and the event loop stays free for
everyone else; the cache follows the probe as it changes."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx

from master_controller.runtimes.base import ProbeResult
from master_controller.settings import Settings
from tests.web.inprocess import LoopWatch, NoGuestRuntime, app_settings, serving

# long against what an answer takes on a loaded 2-core host (tenths of a second for a
# burst, client and server sharing one loop), so that the bounds below hold with margin
PROBE_SECONDS = 5.0


async def test_a_burst_of_health_checks_never_waits_for_a_probe(tmp_path: Path) -> None:
    settings = app_settings(tmp_path, f"sqlite:///{tmp_path / 'mc.db'}")
    runtime = NoGuestRuntime.with_probe(PROBE_SECONDS)
    # a background probe every 0.2 s: one is nearly always running during the burst
    async with serving(settings, runtime(settings), probe_interval=0.2) as (base, _):
        assert runtime.probe_calls  # one ran at start-up, before serving
        latencies: list[float] = []

        async def check(client: httpx.AsyncClient) -> dict[str, object]:
            started = time.monotonic()
            answer = await client.get(base + "/api/health")
            latencies.append(time.monotonic() - started)
            assert answer.status_code == 200
            return dict(answer.json())

        async with httpx.AsyncClient(trust_env=False, timeout=60) as client, LoopWatch() as loop:
            burst_started = time.monotonic()
            answers = []
            for _ in range(3):  # 3 x 10 at once, spread over more than a probe's time
                answers += await asyncio.gather(*(check(client) for _ in range(10)))
                await asyncio.sleep(PROBE_SECONDS / 2)
            burst = time.monotonic() - burst_started

        assert all(a["runtime"]["usable"] for a in answers)  # type: ignore[index]
        assert all(a["runtime"]["checkedAt"] for a in answers)  # type: ignore[index]
        # no answer waited for a probe; the loop never stalled for one
        assert max(latencies) < PROBE_SECONDS / 2, sorted(latencies)[-5:]
        assert loop.worst < PROBE_SECONDS / 2, loop.worst
        # probes ran one after another in the background, never per request
        during = [t for t in runtime.probe_calls if t >= burst_started]
        assert 1 <= len(during) <= burst / PROBE_SECONDS + 1


class _Flaky(NoGuestRuntime):
    answer: ProbeResult | Exception = ProbeResult(True, "fine")

    @classmethod
    def probe(cls, settings: Settings) -> ProbeResult:
        if isinstance(cls.answer, Exception):
            raise cls.answer
        return cls.answer


async def test_the_cache_follows_the_probe(tmp_path: Path) -> None:
    settings = app_settings(tmp_path, f"sqlite:///{tmp_path / 'mc.db'}")
    _Flaky.answer = ProbeResult(True, "fine")
    async with serving(settings, _Flaky(settings), probe_interval=0.05) as (base, _):

        async def runtime_health(expect: bool, reason: str) -> dict[str, object]:
            """/api/health's runtime once it says ``reason`` (or after 10 s)."""
            deadline = time.monotonic() + 10
            while True:
                async with httpx.AsyncClient(trust_env=False) as client:
                    health = (await client.get(base + "/api/health")).json()
                runtime = dict(health["runtime"])
                if runtime["reason"] == reason or time.monotonic() > deadline:
                    return runtime
                await asyncio.sleep(0.05)

        fine = await runtime_health(True, "fine")
        assert (fine["usable"], fine["reason"]) == (True, "fine")
        _Flaky.answer = ProbeResult(False, "KVM went away")
        went = await runtime_health(False, "KVM went away")
        assert (went["usable"], went["reason"]) == (False, "KVM went away")
        _Flaky.answer = OSError("qemu-system-x86_64: not found")
        gone = await runtime_health(False, "the probe failed: qemu-system-x86_64: not found")
        assert gone["reason"] == "the probe failed: qemu-system-x86_64: not found"
        assert gone["usable"] is False
        _Flaky.answer = ProbeResult(True, "fine again")
        back = await runtime_health(True, "fine again")
        assert (back["usable"], back["reason"]) == (True, "fine again")
