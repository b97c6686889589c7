"""The viewer page's weight: every request the page makes before it would draw the first
frame (its HTML, script modules, styles; noVNC's modules), their number and bytes as sent
(compressed where the server compresses), in a real Chromium against the controller's app in
this process (a fake runtime and agent stand in for the guest: the frame itself is not
part of the figure).

    .venv/bin/python -m bench.viewer_weight

Prints the figures and saves them to bench/results/viewer-weight.json.
"""

from __future__ import annotations

import asyncio
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from playwright.async_api import async_playwright

from bench import save
from tests.web.inprocess import fake_guest_controller
from tests.web.test_viewer_browser import CHROMIUM, QUIET

RESULTS = Path(__file__).parent / "results" / "viewer-weight.json"


async def main() -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        async with (
            fake_guest_controller(Path(tmp), {"bench": ("sessions",)}) as served,
            httpx.AsyncClient(trust_env=False) as http,
            async_playwright() as p,
        ):
            started = await http.post(
                served.base + "/api/auth/start",
                json={"userId": "bench", "provider": "codex"},
                headers={"Authorization": f"Bearer {served.keys['bench']}"},
            )
            link = urlsplit(started.json()["novncURL"])
            browser = await p.chromium.launch(executable_path=CHROMIUM, args=QUIET)
            page = await browser.new_page()
            loaded: list[tuple[str, int]] = []

            async def count(response: Any) -> None:
                if response.request.resource_type == "websocket":
                    return
                sizes = await response.request.sizes()
                loaded.append((urlsplit(response.url).path, sizes["responseBodySize"]))

            page.on("response", count)
            await page.goto(f"{served.base}{link.path}?{link.query}")
            await page.wait_for_function("document.body.dataset.state !== 'loading'")
            await page.wait_for_timeout(1500)  # the status polls and module loads settle
            await browser.close()
    scripts = [(path, size) for path, size in loaded if path.endswith(".js")]
    return {
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "requests": len(loaded),
        "bytes": sum(size for _, size in loaded),
        "script_modules": len(scripts),
        "script_bytes": sum(size for _, size in scripts),
        "largest": sorted(loaded, key=lambda item: -item[1])[:5],
    }


if __name__ == "__main__":
    save(asyncio.run(main()), RESULTS)
