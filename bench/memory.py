"""Memory per container guest, as proportional set size (PSS): every process in the guest's
cgroups (Chromium's sandboxed renderers included: they run in PID namespaces of their own,
which a count by the guest's PID namespace missed, about 95 MiB per guest before 2026-12-01),
each shared page split among the processes that share it, so the guests' sums add up to
what they cost together. Shared file pages (the image's libraries, one copy in the page cache
for every guest) divide among more guests as more run: the figure falls with the count.
Measured idle (after the first frame, settled), with a page open in its Chromium (a new
tab; the page is Chromium's own error page, the only one a guest can load here), and with
websockify started (it is socket-activated: it runs only while noVNC inside the guest is
used, and exits 30 s after its last client).

    .venv/bin/python -m bench.memory [--guests N] [--settle S] [--memory-merging]

With ``--memory-merging`` the guests start with ``guest_memory_merging`` on, and the host's
KSM runs for the measurement (``/sys/kernel/mm/ksm/run`` is set back afterwards); each
measurement waits for two full KSM scans.

Prints and saves bench/results/memory-<N>.json (per guest: PSS, its anonymous, file and
shared-memory parts, and the five largest processes by PSS).
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import save, summary
from bench.controller import ensure_image
from master_controller.agent_client import GuestAgent
from master_controller.runtimes import cgroups, memmerge
from master_controller.runtimes.base import GuestSecrets, GuestState
from master_controller.runtimes.container import ContainerRuntime
from master_controller.settings import Settings
from master_controller.viewing.readiness import non_blank_frame, poll, websocket_upgrade
from mc_agent import WEBSOCKIFY_PORT

RESULTS = Path(__file__).parent / "results"
PASSWORD = "benchpw1"


KINDS = ("Pss_Anon", "Pss_File", "Pss_Shmem")


def pss_by_process(pids: set[int], kinds: dict[str, int] | None = None) -> dict[str, int]:
    """KiB of PSS per command name, over the processes ``pids`` (and, into ``kinds``, the
    total of each of KINDS)."""
    found: dict[str, int] = defaultdict(int)
    for pid in pids:
        entry = Path("/proc") / str(pid)
        try:
            comm = (entry / "comm").read_text().strip()
            rollup = (entry / "smaps_rollup").read_text()
        except OSError:
            continue  # gone meanwhile, or a kernel thread
        for line in rollup.splitlines():
            name, _, value = line.partition(":")
            if name == "Pss":
                found[comm] += int(value.split()[0])
            elif kinds is not None and name in KINDS:
                kinds[name] = kinds.get(name, 0) + int(value.split()[0])
    return dict(found)


def measure(guest: GuestState) -> dict[str, Any]:
    paths = guest.resources.get("cgroups")
    assert isinstance(paths, list) and paths, "the guest has no recorded cgroups"
    kinds: dict[str, int] = {}
    processes = pss_by_process(cgroups.processes(paths), kinds)
    top = sorted(processes.items(), key=lambda kv: kv[1], reverse=True)[:5]
    return {
        "pss_mib": round(sum(processes.values()) / 1024, 1),
        **{f"{kind.lower()}_mib": round(kinds.get(kind, 0) / 1024, 1) for kind in KINDS},
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


async def ksm_scans(count: int, timeout: float = 600.0) -> None:
    """Wait until the kernel's KSM finished ``count`` more full scans of mergeable memory."""
    scans = memmerge.KSM_RUN.parent / "full_scans"
    target = int(scans.read_text()) + count
    deadline = asyncio.get_running_loop().time() + timeout
    while int(scans.read_text()) < target:
        assert asyncio.get_running_loop().time() < deadline, "KSM did not finish its scans"
        await asyncio.sleep(1)


async def run(settings: Settings, image_id: str, count: int, settle: float) -> dict[str, Any]:
    runtime = ContainerRuntime(settings)
    guests: list[GuestState] = []
    try:
        for _ in range(count):  # one at a time: a boot's own peak is not what we measure
            guests.append(await boot(runtime, image_id))
        await asyncio.sleep(settle)
        if settings.guest_memory_merging:
            await ksm_scans(2)
        idle = [measure(g) for g in guests]
        for guest in guests:
            await GuestAgent(runtime, guest).open_url("http://mc-bench.invalid/")
        await asyncio.sleep(settle)
        if settings.guest_memory_merging:
            await ksm_scans(2)
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
    parser.add_argument("--memory-merging", action="store_true")
    args = parser.parse_args()
    settings = Settings(
        data_dir=args.data_dir,
        guest_network="10.213.192.0/20",
        guest_memory_merging=args.memory_merging,
    )
    image_id = ensure_image(settings)
    ksm_before = memmerge.KSM_RUN.read_text() if args.memory_merging else None
    try:
        if ksm_before is not None:
            memmerge.KSM_RUN.write_text("1")
        figures: dict[str, Any] = {
            "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "image": image_id,
            "guests": args.guests,
            "guest_memory_merging": args.memory_merging,
            "settle_seconds": args.settle,
            **asyncio.run(run(settings, image_id, args.guests, args.settle)),
        }
    finally:
        if ksm_before is not None:
            memmerge.KSM_RUN.write_text(ksm_before)
    merged = "-merged" if args.memory_merging else ""
    save(figures, RESULTS / f"memory-{args.guests}{merged}.json")


if __name__ == "__main__":
    main()
