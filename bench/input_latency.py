"""Input latency through the viewer: a key pressed on the viewer page (Playwright, Debian's
Chromium) to the first changed pixel the page draws, over the controller's proxy.

The guest shows a page that flips its whole background at each key press, so the change is
unambiguous (no caret blinking, no partial updates). The time runs from the page's own
keydown event (before noVNC sends the key) to the moment the canvas pixel under the middle
of the screen has changed (polled with a message loop, well under a millisecond apart).

    .venv/bin/python -m bench.input_latency [--presses N] [--data-dir DIR]

Prints the figures and saves them to bench/results/input-latency.json.
"""

from __future__ import annotations

import argparse
import base64
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from playwright.sync_api import Page, sync_playwright

from bench import save
from bench.controller import CANVAS_DRAWN, bench_controller, ensure_image
from master_controller.runtimes.container import ContainerRuntime
from master_controller.settings import Settings
from tests.servers import Controller

RESULTS = Path(__file__).parent / "results" / "input-latency.json"
FLIPPER = (
    "<!doctype html><title>flip</title><body style='margin:0;height:100vh;background:#000'>"
    "<script>let n=0;addEventListener('keydown',()=>{document.body.style.background="
    "(++n%2)?'#fff':'#000'})</script>"
)
# Armed before each press: the keydown on the page starts the clock, the first changed pixel
# in the middle of the canvas stops it (window.latency, in ms).
ARM = """() => {
  const canvas = document.querySelector('#screen canvas');
  const ctx = canvas.getContext('2d');
  const pixel = () => ctx.getImageData(canvas.width >> 1, canvas.height >> 1, 1, 1).data[0];
  const before = pixel();
  window.latency = null;
  const loop = new MessageChannel();
  let pressed = null;
  loop.port1.onmessage = () => {
    if (pixel() !== before) { window.latency = performance.now() - pressed; return; }
    if (performance.now() - pressed > 5000) { window.latency = -1; return; }
    loop.port2.postMessage(0);
  };
  addEventListener('keydown', () => { pressed = performance.now(); loop.port2.postMessage(0); },
                   { capture: true, once: true });
}"""


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def open_flipper(settings: Settings, page: Page, session_id: str) -> None:
    """Open the flipping page in the guest's Chromium (through its agent: the API opens only
    http(s) URLs) and give it the keyboard."""
    runtime = ContainerRuntime(settings)
    guest = runtime.load(session_id)
    url = "data:text/html;base64," + base64.b64encode(FLIPPER.encode()).decode()
    opened = httpx.post(
        runtime.endpoint(guest).agent_url + "/open-url",
        json={"url": url},
        headers={"Authorization": f"Bearer {guest.secrets.agent_token}"},
        trust_env=False,
        timeout=10,
    )
    assert opened.status_code == 200, opened.text
    time.sleep(3)  # the new tab loads and is raised
    box = page.locator("#screen canvas").bounding_box()
    assert box is not None
    page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)


def measure(ctl: Controller, settings: Settings, presses: int) -> dict[str, Any]:
    started = ctl.request("POST", "/api/auth/start", json={"userId": "lat", "provider": "codex"})
    session_id = started.json()["sessionId"]
    ctl.wait_for(session_id, {"ready"}, timeout=120)
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path="/usr/bin/chromium",
            args=["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync"],
        )
        page = browser.new_page(viewport={"width": 1280, "height": 840})
        page.goto(started.json()["novncURL"])
        page.wait_for_function("document.body.dataset.state === 'connected'", timeout=90_000)
        page.wait_for_function(CANVAS_DRAWN, timeout=60_000)
        open_flipper(settings, page, session_id)
        samples: list[float] = []
        lost = 0
        for _ in range(presses + 3):
            page.evaluate(ARM)
            page.keyboard.press("a")
            page.wait_for_function("window.latency !== null", timeout=10_000, polling=10)
            latency = float(page.evaluate("window.latency"))
            if latency < 0:
                lost += 1
            else:
                samples.append(latency)
            time.sleep(0.15)
        browser.close()
    ctl.request("POST", f"/api/auth/session/{session_id}/cancel")
    samples = samples[3:]  # the first presses warm up the path
    return {
        "presses": len(samples),
        "lost": lost,
        "key_to_pixel_ms": {
            "p50": round(statistics.median(samples), 1),
            "p95": round(percentile(samples, 0.95), 1),
            "min": round(min(samples), 1),
            "max": round(max(samples), 1),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", type=Path, default=Path("/var/lib/master-controller-bench"))
    parser.add_argument("--presses", type=int, default=50)
    args = parser.parse_args()
    settings = Settings(data_dir=args.data_dir, guest_network="10.213.208.0/20")
    figures: dict[str, Any] = {
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "image": ensure_image(settings),
        "runtime": "container",
        "path": "Playwright key press -> noVNC -> controller proxy -> (TCP) x11vnc -> "
        "Chromium repaints -> x11vnc -> proxy -> noVNC draws",
    }
    with bench_controller(settings) as ctl:
        figures.update(measure(ctl, settings, args.presses))
    save(figures, RESULTS)


if __name__ == "__main__":
    main()
