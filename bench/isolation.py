"""What a container guest's isolation costs: the disk quota (a loop-mounted ext4 made on the
first start), the ID-mapped lower layer and overlay ("disk layer" step), the guest's own
cgroups with their limits and its user namespace ("boot" step, nspawn start), time to the
first frame, a restart (the disk layer is only mounted again), and destroy (cgroup.kill,
then removal). Also the ID-mapped mount, the disk layer and the limited cgroups alone.

    .venv/bin/python -m bench.isolation [--guests 5] [--image ID]

Prints the figures and saves them to bench/results/container-isolation.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import subprocess
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import save, summary
from bench.controller import ensure_image
from master_controller.images.store import ImageStore
from master_controller.runtimes import cgroups, idmap
from master_controller.runtimes.base import GuestSecrets
from master_controller.runtimes.container import ContainerRuntime
from master_controller.runtimes.disklayer import DiskLayer
from master_controller.settings import Settings
from master_controller.steps import StepLog
from master_controller.viewing.readiness import non_blank_frame, poll

RESULTS = Path(__file__).parent / "results" / "container-isolation.json"
PASSWORD = "benchiso"


async def one_guest(runtime: ContainerRuntime, image_id: str) -> dict[str, float]:
    guest = await runtime.create(
        f"iso-{secrets.token_hex(4)}",
        image_id,
        GuestSecrets(vnc_password=PASSWORD, agent_token=secrets.token_hex(16)),
    )
    steps = StepLog()
    started = time.monotonic()
    try:
        await runtime.start(guest, steps)
        url = runtime.endpoint(guest).vnc_url
        deadline = started + 120
        await poll(lambda: non_blank_frame(url, PASSWORD, deadline), deadline, 0.1)
        first_frame = time.monotonic() - started
        await runtime.stop(guest)
        again = StepLog()
        await runtime.start(guest, again)  # the disk layer exists: mounted, not made
    finally:
        destroy_started = time.monotonic()
        await runtime.destroy(guest)
        destroyed = time.monotonic() - destroy_started
    seconds = {r.name: r.seconds for r in steps.records}
    return {
        "disk_layer_s": seconds["disk layer"],
        "disk_layer_restart_s": next(r.seconds for r in again.records if r.name == "disk layer"),
        "boot_step_s": seconds["boot"],
        "first_frame_s": first_frame,
        "destroy_s": destroyed,
    }


def idmapped_mount_alone(source: Path, runs: int = 20) -> list[float]:
    took = []
    with tempfile.TemporaryDirectory() as target:
        for _ in range(runs):
            started = time.monotonic()
            idmap.mount_idmapped(source, Path(target), idmap.base_for(4000))
            took.append(time.monotonic() - started)
            subprocess.run(["umount", target], check=True)
    return took


def disk_layer_alone(size_mib: int, runs: int = 10) -> dict[str, list[float]]:
    """Milliseconds to make and mount a new layer (a guest's first start), to mount an
    existing one (later starts) and to unmount it (with its loop device)."""
    took: dict[str, list[float]] = {"first_mount_ms": [], "mount_ms": [], "unmount_ms": []}
    for _ in range(runs):
        with tempfile.TemporaryDirectory() as folder:
            layer = DiskLayer(Path(folder), size_mib, owner=idmap.base_for(4000))
            for key in ("first_mount_ms", "mount_ms"):
                started = time.monotonic()
                layer.__enter__()
                took[key].append((time.monotonic() - started) * 1000)
                started = time.monotonic()
                layer.__exit__(None, None, None)
                took["unmount_ms"].append((time.monotonic() - started) * 1000)
    return took


def limited_cgroups_alone(settings: Settings, runs: int = 20) -> list[float]:
    """Milliseconds to make a guest's cgroups and write its limits."""
    took = []
    for _ in range(runs):
        started = time.monotonic()
        paths = cgroups.create(
            f"bench-{secrets.token_hex(4)}", cgroups.Limits.from_settings(settings)
        )
        took.append((time.monotonic() - started) * 1000)
        cgroups.remove(paths)
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", type=Path, default=Path("/var/lib/master-controller-bench"))
    parser.add_argument("--guests", type=int, default=5)
    parser.add_argument("--image", help="an image in the data dir's store (default: build)")
    args = parser.parse_args()
    settings = Settings(data_dir=args.data_dir, guest_network="10.213.224.0/20")
    image_id = args.image or ensure_image(settings)
    runtime = ContainerRuntime(settings)
    runs = [asyncio.run(one_guest(runtime, image_id)) for _ in range(args.guests)]
    rootfs = ImageStore(settings.images_dir).get(image_id).rootfs
    figures: dict[str, Any] = {
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        # a shared host's load shows in every figure: kept with them
        "load_average_1m": round(os.getloadavg()[0], 1),
        "image": image_id,
        "guests": args.guests,
        **{key: summary([r[key] for r in runs]) for key in runs[0]},
        "idmapped_mount_ms": summary([t * 1000 for t in idmapped_mount_alone(rootfs)]),
        "guest_disk_mib": settings.guest_disk_mib,
        **{
            f"disk_layer_{key}": summary(values)
            for key, values in disk_layer_alone(settings.guest_disk_mib).items()
        },
        "limited_cgroups_ms": summary(limited_cgroups_alone(settings)),
    }
    save(figures, RESULTS)


if __name__ == "__main__":
    main()
