"""Hibernate and resume, QEMU (TCG here) and containers: start to first frame (cold),
hibernate time and snapshot size, resume to first frame, and the resume/cold ratio.

    .venv/bin/python -m bench.hibernate [--runtimes qemu,container]

Prints the figures and saves them to bench/results/hibernate.json.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import save
from bench.controller import ensure_image
from master_controller.readiness import non_blank_frame, poll
from master_controller.runtimes import RUNTIMES
from master_controller.runtimes.base import GuestSecrets, Runtime
from master_controller.settings import Settings

RESULTS = Path(__file__).parent / "results" / "hibernate.json"
PASSWORD = "benchhib"


async def first_frame(runtime: Runtime, guest_url: str, started: float) -> float:
    deadline = started + 300
    await poll(lambda: non_blank_frame(guest_url, PASSWORD, deadline), deadline, 0.1)
    return time.monotonic() - started


async def measure(runtime: Runtime, image_id: str) -> dict[str, Any]:
    guest_secrets = GuestSecrets(vnc_password=PASSWORD, agent_token=secrets.token_hex(16))
    guest = await runtime.create(f"bench-h-{secrets.token_hex(3)}", image_id, guest_secrets)
    try:
        started = time.monotonic()
        await runtime.start(guest)
        url = runtime.endpoint(guest).websocket_url
        cold = await first_frame(runtime, url, started)
        started = time.monotonic()
        await runtime.hibernate(guest)
        hibernate = time.monotonic() - started
        snapshot = guest.resources.get("snapshot", {}).get("bytes", 0)
        started = time.monotonic()
        await runtime.resume(guest)
        resume = await first_frame(runtime, url, started)
    finally:
        await runtime.destroy(guest)
    return {
        "start_to_first_frame_seconds": round(cold, 2),
        "hibernate_seconds": round(hibernate, 2),
        "snapshot_mib": round(snapshot / 2**20, 1),
        "resume_to_first_frame_seconds": round(resume, 2),
        "resume_vs_cold": round(resume / cold, 3),
        "keeps": "memory and disk" if snapshot else "disk only (boots again)",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", type=Path, default=Path("/var/lib/master-controller-bench"))
    parser.add_argument("--runtimes", default="qemu,container")
    args = parser.parse_args()
    settings = Settings(data_dir=args.data_dir, guest_network="10.213.224.0/20")
    image_id = ensure_image(settings)
    figures: dict[str, Any] = {
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "image": image_id,
        "vm": {"cpus": settings.vm_cpus, "memory_mib": settings.vm_memory_mib, "accel": "tcg"},
    }
    for name in args.runtimes.split(","):
        figures[name] = asyncio.run(measure(RUNTIMES[name](settings), image_id))
    save(figures, RESULTS)


if __name__ == "__main__":
    main()
