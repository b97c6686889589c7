"""Image build and container boot figures: cold build, warm rebuild after changing one unit,
image size, container start to WebSocket 101 and to the first non-blank frame.

    .venv/bin/python -m bench.images [--data-dir DIR] [--skip-cold] [--boots N]

Prints the figures and saves them to bench/results/images.json.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import save, summary
from master_controller.images.builder import ImageBuilder
from master_controller.images.recipe import Recipe
from master_controller.images.store import ImageStore
from master_controller.runtimes.base import GuestSecrets
from master_controller.runtimes.container import ContainerRuntime
from master_controller.settings import REPO_ROOT, Settings
from master_controller.viewing.readiness import non_blank_frame, poll, websocket_upgrade

RESULTS = Path(__file__).parent / "results" / "images.json"


def warm_recipe(folder: Path) -> Recipe:
    """The default recipe with one unit changed (a new comment each run)."""
    source = REPO_ROOT / "images/browser"
    unit = folder / "openbox.service"
    unit.write_text((source / "units/openbox.service").read_text() + f"# {time.time_ns()}\n")
    recipe = folder / "recipe.toml"
    recipe.write_text(
        f'extends = "{source / "recipe.toml"}"\nname = "bench-warm"\n'
        '[[units]]\nname = "openbox.service"\nsource = "openbox.service"\n'
    )
    return Recipe.load(recipe)


async def boot_once(runtime: ContainerRuntime, image_id: str) -> dict[str, float]:
    guest_secrets = GuestSecrets(vnc_password="benchpw1", agent_token=secrets.token_hex(16))
    guest = await runtime.create(f"bench-{secrets.token_hex(4)}", image_id, guest_secrets)
    try:
        started = time.monotonic()
        await runtime.start(guest)
        endpoint = runtime.endpoint(guest)
        deadline = started + 120
        await poll(lambda: websocket_upgrade(endpoint.address, 6080), deadline, interval=0.05)
        ws101 = time.monotonic() - started
        await poll(
            lambda: non_blank_frame(endpoint.vnc_url, "benchpw1", deadline),
            deadline,
            interval=0.05,
        )
        return {"websocket_101": ws101, "first_frame": time.monotonic() - started}
    finally:
        await runtime.destroy(guest)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", type=Path, default=Path("/var/lib/master-controller-bench"))
    parser.add_argument("--skip-cold", action="store_true", help="keep the cached base layer")
    parser.add_argument("--boots", type=int, default=5)
    args = parser.parse_args()
    settings = Settings(data_dir=args.data_dir, guest_network="10.213.192.0/20")
    figures: dict[str, Any] = {"measured_at": datetime.now(UTC).isoformat(timespec="seconds")}

    cold = ImageBuilder(settings).build(
        Recipe.load(settings.recipe), refresh_base=not args.skip_cold
    )
    if not args.skip_cold:
        figures["cold_build_seconds"] = round(cold.seconds, 1)
        figures["cold_build_steps"] = {s["name"]: s["seconds"] for s in cold.steps}
    with tempfile.TemporaryDirectory() as folder:
        warm = ImageBuilder(settings).build(warm_recipe(Path(folder)))
    figures["warm_rebuild_one_unit_seconds"] = round(warm.seconds, 1)
    figures["warm_rebuild_steps"] = {s["name"]: s["seconds"] for s in warm.steps}

    manifest = ImageStore(settings.images_dir).get(cold.image_id).manifest
    sizes = manifest["sizes"]
    figures["image"] = {
        "id": cold.image_id,
        "packages": len(manifest["packages"]),
        "rootfs_mib": round(sizes["rootfs"] / 2**20),
        "disk_mib": round(sizes["disk"] / 2**20),
        "disk_allocated_mib": round(sizes["disk_allocated"] / 2**20),
        "kernel_initrd_mib": round((sizes["kernel"] + sizes["initrd"]) / 2**20, 1),
    }

    runtime = ContainerRuntime(settings)
    boots = [asyncio.run(boot_once(runtime, cold.image_id)) for _ in range(args.boots)]
    figures["container_start_to_websocket_101_seconds"] = summary(
        [b["websocket_101"] for b in boots]
    )
    figures["container_start_to_first_frame_seconds"] = summary([b["first_frame"] for b in boots])
    figures["boots"] = args.boots
    ImageStore(settings.images_dir).gc(keep=0, in_use={cold.image_id})

    save(figures, RESULTS)


if __name__ == "__main__":
    main()
