"""The egress proxy under a hostile guest, on loopback (guests are loopback source
addresses; the origin is an echo server on 127.0.0.1):

- flood: one guest holding its cap of tunnels opens 10,000 more connections from another
  process (threads with blocking sockets); how many are refused per second and the proxy's
  CPU time per attempt, its memory (tracemalloc: what is still allocated after the flood
  of what was allocated since it began; RSS) and tasks, and how long another guest waits
  for a tunnel meanwhile (it opens one after the other while the flood runs);
- revoke: time from ``revoke()`` until every one of a guest's tunnels is closed at the
  guest's end;
- relay: bytes per second through one tunnel.

    .venv/bin/python -m bench.egress [--flood 10000] [--cap 32]

Prints the figures and saves them to bench/results/egress.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import subprocess
import sys
import time
import tracemalloc
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import save, summary
from tests.network.egress_helpers import (
    GUEST_A,
    GUEST_B,
    allowance,
    closed,
    origin,
    running_proxy,
    tunnel,
)

RESULTS = Path(__file__).parent / "results" / "egress.json"
ATTACKER = """
import json, socket, sys, time
from concurrent.futures import ThreadPoolExecutor
port, source, count = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
def attempt(_):
    try:
        with socket.create_connection(("127.0.0.1", port), 10, (source, 0)) as s:
            data = b""
            while chunk := s.recv(4096):
                data += chunk
            return "429" if data.startswith(b"HTTP/1.1 429 ") else "other"
    except OSError as exc:
        return type(exc).__name__
started = time.monotonic()
with ThreadPoolExecutor(16) as pool:
    outcomes = list(pool.map(attempt, range(count)))
elapsed = time.monotonic() - started
print(json.dumps({"seconds": elapsed, **{o: outcomes.count(o) for o in set(outcomes)}}))
"""


def rss_mib() -> float:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)


async def flood(count: int, cap: int, trace: bool) -> dict[str, Any]:
    """The flood; with ``trace``, memory is traced (which slows everything down, so the
    rates and times of a traced run are not reported)."""
    async with origin() as up:
        mapped = {f"allowed.test:{up.port}": "127.0.0.1"}
        target = f"allowed.test:{up.port}"
        async with running_proxy(egress_hosts=mapped, egress_max_connections=cap) as (
            egress,
            port,
        ):
            for guest in (GUEST_A, GUEST_B):
                egress.grant(guest, allowance("allowed.test", ports={up.port}, session=guest))
            held = [await tunnel(port, target, GUEST_A) for _ in range(cap)]
            if trace:
                tracemalloc.start()
            rss_before, tasks_before = rss_mib(), len(asyncio.all_tasks())
            cpu_before = time.process_time()
            attacker = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                ATTACKER,
                str(port),
                GUEST_A,
                str(count),
                stdout=subprocess.PIPE,
            )
            waits, most_tasks, most_open = [], 0, 0
            while attacker.returncode is None:
                started = time.monotonic()
                _, writer = await tunnel(port, target, GUEST_B)
                waits.append(time.monotonic() - started)
                writer.close()
                most_tasks = max(most_tasks, len(asyncio.all_tasks()))
                most_open = max(most_open, egress.open_connections(GUEST_A))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(attacker.wait(), 0.2)
            out, _ = await attacker.communicate()
            cpu = time.process_time() - cpu_before
            await asyncio.sleep(0.2)
            after, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            most_tasks = max(most_tasks, len(asyncio.all_tasks()))
            outcome = json.loads(out)
            for _, writer in held:
                writer.close()
    if trace:
        return {
            "traced_kib_after_and_peak": [round(after / 1024), round(peak / 1024)],
            "rss_mib_before_after": [rss_before, rss_mib()],
            "proxy_tasks_before_and_max": [tasks_before, most_tasks],
        }
    return {
        "attempts": count,
        "per_guest_cap": cap,
        "outcomes": {k: v for k, v in outcome.items() if k != "seconds"},
        "refused_per_second": round(outcome.get("429", 0) / outcome["seconds"]),
        # the proxy process's CPU time per attempt (the other guest's tunnels included)
        "proxy_cpu_us_per_attempt": round(cpu / count * 1e6),
        "guest_open_connections_max": most_open,
        "proxy_tasks_before_and_max": [tasks_before, most_tasks],
        "other_guest_tunnel_ms_during_flood": summary([w * 1000 for w in waits]),
        "other_guest_tunnels_opened": len(waits),
    }


async def revoke(tunnels: int, rounds: int) -> dict[str, Any]:
    calls, closes = [], []
    async with origin() as up:
        mapped = {f"allowed.test:{up.port}": "127.0.0.1"}
        async with running_proxy(egress_hosts=mapped, egress_max_connections=tunnels) as (
            egress,
            port,
        ):
            for _ in range(rounds):
                egress.grant(GUEST_A, allowance("allowed.test", ports={up.port}))
                held = [await tunnel(port, f"allowed.test:{up.port}") for _ in range(tunnels)]
                started = time.monotonic()
                assert egress.revoke(GUEST_A) == tunnels
                calls.append(time.monotonic() - started)
                assert all(await asyncio.gather(*(closed(r, 5) for r, _ in held)))
                closes.append(time.monotonic() - started)
                for _, writer in held:
                    writer.close()
    return {
        "tunnels": tunnels,
        "revoke_call_ms": summary([c * 1000 for c in calls]),
        "all_closed_at_guest_ms": summary([c * 1000 for c in closes]),
    }


async def relay(mib: int) -> dict[str, Any]:
    async with origin() as up:
        mapped = {f"allowed.test:{up.port}": "127.0.0.1"}
        async with running_proxy(egress_hosts=mapped) as (egress, port):
            egress.grant(GUEST_A, allowance("allowed.test", ports={up.port}))
            reader, writer = await tunnel(port, f"allowed.test:{up.port}")
            block = b"x" * 4096
            total = mib * 2**20
            started = time.monotonic()

            async def send() -> None:
                for _ in range(total // len(block)):
                    writer.write(block)
                    await writer.drain()

            async def receive() -> None:
                got = 0
                while got < total:  # "echo:" prefixes stretch it a little
                    got += len(await reader.read(2**16))

            await asyncio.gather(send(), receive())
            seconds = time.monotonic() - started
            writer.close()
    return {"mib": mib, "mib_per_second": round(mib / seconds, 1)}


async def main(count: int, cap: int) -> dict[str, Any]:
    return {
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "load_average_at_start": [round(x, 1) for x in os.getloadavg()],
        "nofile_soft_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        "flood": await flood(count, cap, trace=False),
        "flood_memory": await flood(count, cap, trace=True),
        "revoke": await revoke(cap, 10),
        "relay_through_one_tunnel": await relay(64),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flood", type=int, default=10_000)
    parser.add_argument("--cap", type=int, default=32)
    args = parser.parse_args()
    save(asyncio.run(main(args.flood, args.cap)), RESULTS)
