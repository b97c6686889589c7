"""Memory per container guest, as proportional set size (PSS): every process in the guest's
PID namespace, each shared page split among the processes that share it, so the guests'
sums add up to what they cost together. Measured idle (after the first frame, settled),
with a page open in its Chromium (a new tab; the page is Chromium's own error page, the
only one a guest can load here), and with websockify started (it is socket-activated: it
runs only while noVNC inside the guest is used, and exits 30 s after its last client).

    .venv/bin/python -m bench.memory [--guests N] [--settle S]

Prints and saves bench/results/memory-<N>.json (per guest, and the five largest
processes by PSS).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import save, summary
from bench.controller import ensure_image
from master_controller.agent_client import GuestAgent
from master_controller.runtimes.base import GuestSecrets, GuestState
from master_controller.runtimes.container import ContainerRuntime
from master_controller.settings import Settings
from master_controller.viewing.readiness import non_blank_frame, poll, websocket_upgrade
from mc_agent import WEBSOCKIFY_PORT

RESULTS = Path(__file__).parent / "results"
PASSWORD = "benchpw1"


def pss_by_process(pid_namespace: str) -> dict[str, int]:
    """KiB of PSS per command name, over the processes in ``pid_namespace``."""
    found: dict[str, int] = defaultdict(int)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.readlink(entry / "ns" / "pid") != pid_namespace:
                continue
            comm = (entry / "comm").read_text().strip()
            rollup = (entry / "smaps_rollup").read_text()
        except OSError:
            continue  # gone meanwhile, or a kernel thread
        for line in rollup.splitlines():
            if line.startswith("Pss:"):
                found[comm] += int(line.split()[1])
    return dict(found)


def measure(guest: GuestState) -> dict[str, Any]:
    namespace = guest.resources.get("pid_namespace")
    assert isinstance(namespace, str), "the guest has no recorded PID namespace"
    processes = pss_by_process(namespace)
    top = sorted(processes.items(), key=lambda kv: kv[1], reverse=True)[:5]
    return {
        "pss_mib": round(sum(processes.values()) / 1024, 1),
        "largest_mib": {name: round(kib / 1024, 1) for name, kib in top},
        # socket-activated: 0 until someone opens noVNC in the guest (it ran always before)
        "websockify_mib": round(processes.get("websockify", 0) / 1024, 1),
    }


async def boot(runtime: ContainerRuntime, image_id: str) -> GuestState:
    guest = await runtime.create(
        f"mem-{secrets.token_hex(4)}",
        image_id,
        GuestSecrets(vnc_password=PASSWORD, agent_token=secrets.token_hex(16)),
    )
    await runtime.start(guest)
    url = runtime.endpoint(guest).vnc_url
    deadline = asyncio.get_running_loop().time() + 240
    await poll(lambda: non_blank_frame(url, PASSWORD, deadline), deadline, 0.5)
    return runtime.load(guest.guest_id)


async def run(settings: Settings, image_id: str, count: int, settle: float) -> dict[str, Any]:
    runtime = ContainerRuntime(settings)
    guests: list[GuestState] = []
    try:
        for _ in range(count):  # one at a time: a boot's own peak is not what we measure
            guests.append(await boot(runtime, image_id))
        await asyncio.sleep(settle)
        idle = [measure(g) for g in guests]
        for guest in guests:
            await GuestAgent(runtime, guest).open_url("http://mc-bench.invalid/")
        await asyncio.sleep(settle)
        page = [measure(g) for g in guests]
        # what websockify costs once started (a WebSocket to 6080, as noVNC in the guest
        # would open): it stays 30 s after its last client, then exits
        for guest in guests:
            await websocket_upgrade(runtime.endpoint(guest).address, WEBSOCKIFY_PORT)
        await asyncio.sleep(2)
        started = [measure(g) for g in guests]
    finally:
        for guest in guests:
            await runtime.destroy(guest)
    return {
        "idle_pss_mib": summary([m["pss_mib"] for m in idle]),
        "with_page_pss_mib": summary([m["pss_mib"] for m in page]),
        "websockify_started_pss_mib": summary([m["pss_mib"] for m in started]),
        "websockify_mib": {
            "idle": summary([m["websockify_mib"] for m in idle]),
            "started": summary([m["websockify_mib"] for m in started]),
        },
        "idle": idle,
        "with_page": page,
        "websockify_started": started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", type=Path, default=Path("/var/lib/master-controller-bench"))
    parser.add_argument("--guests", type=int, default=3)
    parser.add_argument("--settle", type=float, default=15.0)
    args = parser.parse_args()
    settings = Settings(data_dir=args.data_dir, guest_network="10.213.192.0/20")
    image_id = ensure_image(settings)
    figures: dict[str, Any] = {
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "image": image_id,
        "guests": args.guests,
        "settle_seconds": args.settle,
        **asyncio.run(run(settings, image_id, args.guests, args.settle)),
    }
    save(figures, RESULTS / f"memory-{args.guests}.json")


if __name__ == "__main__":
    main()
