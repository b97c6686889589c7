"""Many container guests started at once, straight through the runtime (no controller):
each is created and started together (or ``--concurrency`` at a time), then its viewer path
is checked (a non-blank frame from its VNC server, as the relay reaches it) until the boot
timeout; a guest that dies is reported with the runtime's diagnostics. All are destroyed.

    flock /tmp/mc-integration.lock .venv/bin/python -m bench.burst --guests 40 [--concurrency N]

Prints per-guest outcomes and times and saves bench/results/container-burst-<N>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import save, summary
from master_controller.errors import MCError
from master_controller.images.store import ImageStore
from master_controller.runtimes import hostlimits
from master_controller.runtimes.base import GuestSecrets, GuestState, GuestStatus
from master_controller.runtimes.container import ContainerRuntime
from master_controller.settings import Settings
from master_controller.viewing.readiness import guest_give_up, non_blank_frame, poll

RESULTS = Path(__file__).parent / "results"
DATA_DIR = Path("/var/lib/master-controller-test")
# set: failed guests' console logs are copied there before they are destroyed
KEEP_LOGS = Path(os.environ["BURST_KEEP_LOGS"]) if os.environ.get("BURST_KEEP_LOGS") else None


async def one(
    runtime: ContainerRuntime,
    image_id: str,
    gate: asyncio.Semaphore,
    boot_timeout: float,
    t0: float,
) -> dict[str, Any]:
    out: dict[str, Any] = {"ok": False}
    guest: GuestState | None = None
    try:
        async with gate:
            guest = await runtime.create(
                f"burst-{secrets.token_hex(4)}",
                image_id,
                GuestSecrets(
                    vnc_password=secrets.token_urlsafe(6)[:8], agent_token=secrets.token_hex(16)
                ),
            )
            out["guest"] = guest.guest_id
            started = time.monotonic()
            await runtime.start(guest)
            out["start_s"] = round(time.monotonic() - started, 2)
            url = runtime.endpoint(guest).vnc_url
            deadline = started + boot_timeout
            password = guest.secrets.vnc_password
            await poll(
                lambda: non_blank_frame(url, password, deadline),
                deadline,
                0.5,
                give_up=guest_give_up(runtime, guest),
            )
            out["frame_s"] = round(time.monotonic() - started, 2)
            out["frame_at_s"] = round(time.monotonic() - t0, 2)
            out["ok"] = True
    except MCError as exc:
        out["error"] = exc.reason
        if guest is not None:
            out["status"] = str(runtime.status(guest))
            out["diagnostics"] = runtime.diagnostics(guest)
    return {"state": guest, **out}


async def burst(
    runtime: ContainerRuntime, image_id: str, n: int, concurrency: int, boot_timeout: float
) -> list[dict[str, Any]]:
    gate = asyncio.Semaphore(concurrency)
    t0 = time.monotonic()
    results = await asyncio.gather(
        *(one(runtime, image_id, gate, boot_timeout, t0) for _ in range(n))
    )
    # all checked: only now is anything destroyed (a guest dying late is seen too)
    for r in results:
        guest = r.pop("state")
        if guest is not None:
            if r["ok"] and runtime.status(guest) != GuestStatus.RUNNING:
                r["ok"] = False
                r["error"] = "died after its frame"
                r["diagnostics"] = runtime.diagnostics(guest)
            if not r["ok"] and KEEP_LOGS:
                KEEP_LOGS.mkdir(parents=True, exist_ok=True)
                log = runtime.guest_dir(guest.guest_id) / "console.log"
                if log.exists():
                    (KEEP_LOGS / f"{guest.guest_id}.log").write_bytes(log.read_bytes())
    destroy_started = time.monotonic()
    for guest in runtime.guests():
        if guest.guest_id.startswith("burst-"):
            await runtime.destroy(guest)
    print(f"destroyed in {time.monotonic() - destroy_started:.1f} s")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--guests", type=int, default=40)
    parser.add_argument("--concurrency", type=int, default=0, help="0: all at once")
    parser.add_argument("--boot-timeout", type=float, default=120)
    parser.add_argument("--network", default="10.213.64.0/20")
    # a start is refused unless every mounted layer could fill up: 40 x 2 GiB is more than
    # a small host's disk, and the burst is about starting at once, not about disk size
    parser.add_argument("--disk-mib", type=int, default=1024)
    parser.add_argument(
        "--leave-host-limits",
        action="store_true",
        help="do not raise the host's inotify limits (shows what issue 18 was)",
    )
    args = parser.parse_args()
    if args.leave_host_limits:
        hostlimits.ensure = lambda guests, sysctl=hostlimits.SYSCTL: []  # type: ignore[assignment]
    settings = Settings(data_dir=DATA_DIR, guest_network=args.network, guest_disk_mib=args.disk_mib)
    image_id = ImageStore(settings.images_dir).current()
    assert image_id, "no promoted image in the test data dir"
    runtime = ContainerRuntime(settings)
    concurrency = args.concurrency or args.guests
    started = time.monotonic()
    results = asyncio.run(burst(runtime, image_id, args.guests, concurrency, args.boot_timeout))
    took = time.monotonic() - started
    ok = [r for r in results if r["ok"]]
    for r in results:
        if not r["ok"]:
            print(f"--- {r.get('guest')}: {r.get('error')}\n{r.get('diagnostics', '')}\n")
    figures: dict[str, Any] = {
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "load_average_1m": round(os.getloadavg()[0], 1),
        "cpus": os.cpu_count(),
        "guests": args.guests,
        "concurrency": concurrency,
        "up": len(ok),
        "failed": [
            {k: r.get(k) for k in ("guest", "error", "status")} for r in results if not r["ok"]
        ],
        "start_s": summary([r["start_s"] for r in results if "start_s" in r] or [0]),
        "frame_s": summary([r["frame_s"] for r in ok] or [0]),
        "last_frame_at_s": max((r["frame_at_s"] for r in ok), default=0),
        "total_s": round(took, 1),
    }
    name = f"container-burst-{args.guests}" + ("-limits-left" if args.leave_host_limits else "")
    figures["host_limits_raised"] = not args.leave_host_limits
    save(figures, RESULTS / f"{name}.json")


if __name__ == "__main__":
    main()
