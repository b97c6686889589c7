"""Controller figures: POST to ready, POST to first frame in a real browser, and the viewer
proxy's throughput relaying a VNC stream, side by side in one run with the direct paths:
a client straight to the guest's x11vnc over TCP, and straight to its websockify (noVNC's
path inside the guest, WebSocket like the proxy's), each measured in alternating rounds.

    .venv/bin/python -m bench.controller [--sessions N] [--frames N] [--rounds N]

Needs a promoted image in the bench data dir (run bench/images.py first, or it is built).
Prints the figures and saves them to bench/results/controller.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from playwright.sync_api import sync_playwright

from bench import save, summary
from master_controller.images.builder import ImageBuilder
from master_controller.images.recipe import Recipe
from master_controller.images.store import ImageStore
from master_controller.runtimes.container import ContainerRuntime
from master_controller.settings import Settings
from master_controller.verification import Verifier
from master_controller.viewing.guest_socket import rfb_connect
from tests.servers import Controller, controller

RESULTS = Path(__file__).parent / "results" / "controller.json"
CANVAS_DRAWN = """() => {
  const c = document.querySelector('#screen canvas');
  if (!c || !c.width) return false;
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  const seen = new Set();
  for (let i = 0; i < d.length; i += 388) seen.add(d[i] << 16 | d[i + 1] << 8 | d[i + 2]);
  return seen.size > 50;
}"""


@contextmanager
def bench_controller(settings: Settings, **overrides: str) -> Iterator[Controller]:
    """A controller over ``settings``' data dir and guest network, with a throwaway database
    and work folder."""
    with (
        tempfile.TemporaryDirectory() as work,
        controller(
            settings.data_dir,
            f"sqlite:///{work}/mc.db",
            Path(work),
            guest_network=str(settings.guest_network),
            **overrides,
        ) as ctl,
    ):
        yield ctl


def ensure_image(settings: Settings) -> str:
    store = ImageStore(settings.images_dir)
    built = ImageBuilder(settings).build(Recipe.load(settings.recipe))
    if not store.get(built.image_id).verified:
        asyncio.run(Verifier(settings, ContainerRuntime(settings)).verify(built.image_id))
    store.promote(built.image_id)
    return built.image_id


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def pull_frames(
    url: str, password: str | None, headers: dict[str, str] | None, frames: int
) -> tuple[float, int]:
    """Fetch ``frames`` full raw framebuffers; returns (seconds, bytes)."""
    async with rfb_connect(url, password, timeout=30, headers=headers) as client:
        await client.frame()  # warm up
        started = time.monotonic()
        total = 0
        for _ in range(frames):
            frame = await client.frame()
            total += len(frame.pixels)
        return time.monotonic() - started, total


def measure_sessions(ctl: Controller, count: int) -> dict[str, Any]:
    to_ready, to_frame = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path="/usr/bin/chromium",
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        for i in range(count):
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            started = time.monotonic()
            body = ctl.request(
                "POST", "/api/auth/start", json={"userId": f"bench{i}", "provider": "codex"}
            ).json()
            page.goto(body["novncURL"])
            ready_seen = None
            while ready_seen is None:
                state = ctl.request("GET", f"/api/auth/session/{body['sessionId']}").json()
                if state["status"] == "ready":
                    ready_seen = time.monotonic() - started
                elif state["status"] == "failed":
                    raise RuntimeError(state["reason"])
                else:
                    time.sleep(0.02)
            page.wait_for_function(CANVAS_DRAWN, timeout=60_000, polling=50)
            to_frame.append(time.monotonic() - started)
            to_ready.append(ready_seen)
            page.close()
            ctl.request("POST", f"/api/auth/session/{body['sessionId']}/cancel")
        browser.close()
    return {
        "post_to_ready_seconds": summary(to_ready),
        "post_to_first_frame_in_browser_seconds": summary(to_frame),
        "sessions": count,
    }


def measure_proxy(ctl: Controller, settings: Settings, frames: int, rounds: int) -> dict[str, Any]:
    """Raw full frames pulled over each path, the paths alternating round by round (so a
    guest or host that slows down meanwhile slows them all alike); the controller's CPU
    time per MiB on each (nothing but the proxy uses it on the direct paths)."""
    body = ctl.request("POST", "/api/auth/start", json={"userId": "tp", "provider": "codex"}).json()
    sid = body["sessionId"]
    while ctl.request("GET", f"/api/auth/session/{sid}").json()["status"] != "ready":
        time.sleep(0.1)
    time.sleep(10)  # the guest's Chromium settles (its start-up takes the CPU the paths want)
    guest = json.loads((settings.guests_dir / sid / "state.json").read_text())
    password = guest["secrets"]["vnc_password"]
    proxied_url, headers = ctl.viewer(sid)
    paths = {
        "vnc_direct": (f"vnc://{guest['address']}:5900", password, None),
        "websockify_direct": (f"ws://{guest['address']}:6080/", password, None),
        "controller_proxy": (proxied_url, None, headers),
    }
    assert ctl.process is not None
    totals = {name: [0.0, 0, 0.0] for name in paths}  # seconds, bytes, controller CPU
    for _ in range(rounds):
        for name, (url, secret, hdrs) in paths.items():
            cpu_before = cpu_seconds(ctl.process.pid)
            seconds, total = asyncio.run(pull_frames(url, secret, hdrs, frames))
            totals[name][0] += seconds
            totals[name][1] += total
            totals[name][2] += cpu_seconds(ctl.process.pid) - cpu_before
    results: dict[str, Any] = {"rounds": rounds, "frames_per_round": frames}
    for name, (seconds, total, cpu) in totals.items():
        mib = total / 2**20
        results[name] = {
            "mib": round(mib, 1),
            "seconds": round(seconds, 2),
            "mib_per_second": round(mib / seconds, 1),
            "controller_cpu_ms_per_mib": round(cpu * 1000 / mib, 2),
        }
    speed = {name: results[name]["mib_per_second"] for name in paths}
    results["proxy_vs_websockify_direct"] = round(
        speed["controller_proxy"] / speed["websockify_direct"], 2
    )
    results["proxy_vs_vnc_direct"] = round(speed["controller_proxy"] / speed["vnc_direct"], 2)
    ctl.request("POST", f"/api/auth/session/{sid}/cancel")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", type=Path, default=Path("/var/lib/master-controller-bench"))
    parser.add_argument("--sessions", type=int, default=5)
    parser.add_argument("--frames", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    settings = Settings(data_dir=args.data_dir, guest_network="10.213.208.0/20")
    figures: dict[str, Any] = {
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "image": ensure_image(settings),
    }
    # rate limit off: the bench polls the session every 20 ms
    with bench_controller(settings, max_sessions="3", rate_limit_per_minute="0") as ctl:
        figures.update(measure_sessions(ctl, args.sessions))
        figures["throughput_raw_frames"] = measure_proxy(ctl, settings, args.frames, args.rounds)
    save(figures, RESULTS)


if __name__ == "__main__":
    main()
