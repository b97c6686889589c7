"""Load: sessions started together up to the controller's limit, a viewer pulling frames
on each, then one more start (which must get 429).

    .venv/bin/python -m bench.load [--sessions N] [--seconds S]

Reports time to ready (every session, and the last one), host memory per guest
(MemAvailable before and after, divided by the number of guests), relay throughput with
all viewers at once and the controller's CPU per relayed MiB. Saves
bench/results/load-<sessions>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import save, summary
from bench.controller import bench_controller, cpu_seconds, ensure_image
from master_controller.settings import Settings
from master_controller.viewing.guest_socket import rfb_over_websocket
from tests.servers import Controller

RESULTS = Path(__file__).parent / "results"
UP = {"ready", "authenticating"}  # with auto_login, ready turns into authenticating at once


def mem_available_mib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def start_and_wait(ctl: Controller, user: str) -> tuple[str, float]:
    started = time.monotonic()
    body = ctl.request("POST", "/api/auth/start", json={"userId": user, "provider": "codex"})
    body.raise_for_status()
    sid = str(body.json()["sessionId"])
    while (state := ctl.request("GET", f"/api/auth/session/{sid}").json())["status"] not in UP:
        if state["status"] == "failed":
            raise RuntimeError(f"session {sid} failed: {state['reason']}")
        time.sleep(0.1)
    return sid, time.monotonic() - started


async def viewer(ctl: Controller, sid: str, seconds: float) -> int:
    url, headers = ctl.viewer(sid)
    total = 0
    async with rfb_over_websocket(url, None, timeout=30, headers=headers) as client:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            total += len((await client.frame()).pixels)
    return total


async def all_viewers(ctl: Controller, sids: list[str], seconds: float) -> int:
    return sum(await asyncio.gather(*(viewer(ctl, sid, seconds) for sid in sids)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", type=Path, default=Path("/var/lib/master-controller-bench"))
    parser.add_argument("--sessions", type=int, default=Settings().max_sessions)
    parser.add_argument("--seconds", type=float, default=15.0)
    args = parser.parse_args()
    settings = Settings(data_dir=args.data_dir, guest_network="10.213.192.0/20")
    figures: dict[str, Any] = {
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "image": ensure_image(settings),
        "sessions": args.sessions,
        "host_cpus": len(os.sched_getaffinity(0)),
    }
    with (
        bench_controller(
            settings,
            max_sessions=str(args.sessions),
            max_sessions_per_key=str(args.sessions),  # one key starts them all
            # each guest's disk layer is reserved in full: 40 x the default 2 GiB is more
            # than this host's free disk
            guest_disk_mib="1024",
            rate_limit_per_minute="0",
            max_viewers="4",
        ) as ctl,
    ):
        assert ctl.process is not None
        memory_before = mem_available_mib()
        burst_cpu_before = cpu_seconds(ctl.process.pid)
        burst_started = time.monotonic()
        with ThreadPoolExecutor(args.sessions) as pool:
            results = list(
                pool.map(lambda i: start_and_wait(ctl, f"load-{i}"), range(args.sessions))
            )
        burst_seconds = time.monotonic() - burst_started
        figures["controller_cpu_during_burst_percent"] = round(
            100 * (cpu_seconds(ctl.process.pid) - burst_cpu_before) / burst_seconds, 1
        )
        sids = [sid for sid, _ in results]
        ready = sorted(seconds for _, seconds in results)
        time.sleep(3)  # let the guests settle before measuring memory
        used = memory_before - mem_available_mib()
        figures["time_to_ready_seconds"] = summary(ready)
        figures["time_to_ready_last_session_seconds"] = round(ready[-1], 2)
        figures["host_memory_per_guest_mib"] = round(used / args.sessions, 1)

        cpu_before = cpu_seconds(ctl.process.pid)
        relayed = asyncio.run(all_viewers(ctl, sids, args.seconds))
        cpu = cpu_seconds(ctl.process.pid) - cpu_before
        mib = relayed / 2**20
        figures["viewers"] = {
            "count": len(sids),
            "seconds": args.seconds,
            "relayed_mib": round(mib, 1),
            "mib_per_second_total": round(mib / args.seconds, 1),
            "controller_cpu_ms_per_mib": round(1000 * cpu / mib, 2),
        }
        extra = ctl.request(
            "POST", "/api/auth/start", json={"userId": "one-more", "provider": "codex"}
        )
        figures["one_more_session"] = {
            "status": extra.status_code,
            "retry_after": extra.headers.get("Retry-After"),
            "error": extra.json().get("error"),
        }
    save(figures, RESULTS / f"load-{args.sessions}.json")


if __name__ == "__main__":
    main()
