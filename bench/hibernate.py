"""Hibernate and resume per runtime (QEMU, containers, and Firecracker where it can run):
create time and per-guest disk, create to first frame (cold), hibernate time and snapshot
size, resume to first frame, and the resume/cold ratio. Also what a per-guest disk costs
each way: a qcow2 overlay (QEMU) against a reflink-or-sparse copy (Firecracker).

    .venv/bin/python -m bench.hibernate [--runtimes qemu,container,firecracker]

Prints the figures and saves them to bench/results/hibernate.json.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import save
from bench.controller import ensure_image
from master_controller.images.store import ImageStore
from master_controller.runtimes import RUNTIMES
from master_controller.runtimes.base import GuestSecrets, Runtime
from master_controller.runtimes.kvm import kvm_probe
from master_controller.settings import Settings
from master_controller.viewing.readiness import non_blank_frame, poll

RESULTS = Path(__file__).parent / "results" / "hibernate.json"
PASSWORD = "benchhib"


async def first_frame(runtime: Runtime, guest_url: str, started: float) -> float:
    deadline = started + 300
    await poll(lambda: non_blank_frame(guest_url, PASSWORD, deadline), deadline, 0.1)
    return time.monotonic() - started


async def measure(runtime: Runtime, image_id: str) -> dict[str, Any]:
    guest_secrets = GuestSecrets(vnc_password=PASSWORD, agent_token=secrets.token_hex(16))
    started = time.monotonic()
    guest = await runtime.create(f"bench-h-{secrets.token_hex(3)}", image_id, guest_secrets)
    created = time.monotonic() - started
    folder = runtime.guest_dir(guest.guest_id)
    guest_disk = sum(p.stat().st_blocks * 512 for p in folder.rglob("*") if p.is_file())
    try:
        await runtime.start(guest)
        url = runtime.endpoint(guest).vnc_url
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
        "accel": guest.resources.get("accel", "none (container)"),
        "create_seconds": round(created, 3),
        "guest_files_mib_after_create": round(guest_disk / 2**20, 2),
        "create_to_first_frame_seconds": round(cold, 2),
        "hibernate_seconds": round(hibernate, 2),
        "snapshot_mib": round(snapshot / 2**20, 1),
        "resume_to_first_frame_seconds": round(resume, 2),
        "resume_vs_cold": round(resume / cold, 3),
        "keeps": "memory and disk" if snapshot else "disk only (boots again)",
    }


def disk_costs(image: Path, work: Path) -> dict[str, Any]:
    """A per-guest disk each way, from the same image disk."""
    work.mkdir(parents=True, exist_ok=True)
    costs = {}
    for name, argv, out in (
        (
            "qcow2_overlay",
            ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(image), "-F", "raw"],
            work / "overlay.qcow2",
        ),
        (
            "sparse_or_reflink_copy",
            ["cp", "--reflink=auto", "--sparse=always", str(image)],
            work / "copy.ext4",
        ),
    ):
        started = time.monotonic()
        subprocess.run([*argv, str(out)], check=True)
        costs[name] = {
            "seconds": round(time.monotonic() - started, 3),
            "allocated_mib": round(out.stat().st_blocks * 512 / 2**20, 2),
        }
        out.unlink()
    return costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", type=Path, default=Path("/var/lib/master-controller-bench"))
    parser.add_argument("--runtimes", default="qemu,container,firecracker")
    args = parser.parse_args()
    settings = Settings(data_dir=args.data_dir, guest_network="10.213.224.0/20")
    image_id = ensure_image(settings)
    image_disk = ImageStore(settings.images_dir).get(image_id).disk
    figures: dict[str, Any] = {
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "image": image_id,
        "vm": {"cpus": settings.vm_cpus, "memory_mib": settings.vm_memory_mib},
        "kvm": kvm_probe(settings).reason,
        "per_guest_disk": disk_costs(image_disk, settings.cache_dir / "bench-disk"),
    }
    for name in args.runtimes.split(","):
        probe = RUNTIMES[name].probe(settings)
        if not probe.usable:
            figures[name] = {"skipped": probe.reason}
            continue
        figures[name] = asyncio.run(measure(RUNTIMES[name](settings), image_id))
    save(figures, RESULTS)


if __name__ == "__main__":
    main()
