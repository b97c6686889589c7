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
import json
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from playwright.async_api import async_playwright

from bench import save
from master_controller.auth import create_api_key
from master_controller.store.database import Database
from tests.sessions.fake_runtime import FakeAgent, FakeRuntime, FakeViewerPath
from tests.sessions.harness import IMAGE_ID
from tests.web.inprocess import app_settings, serving
from tests.web.test_viewer_browser import CHROMIUM, QUIET

RESULTS = Path(__file__).parent / "results" / "viewer-weight.json"


async def main() -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        url = f"sqlite:///{root / 'mc.db'}"
        settings = app_settings(root, url)
        settings.images_dir.mkdir(parents=True)
        history = {"history": [{"id": IMAGE_ID, "at": "2024-01-01T00:00:00+00:00"}]}
        (settings.images_dir / "promotions.json").write_text(json.dumps(history))
        db = Database(url)
        db.migrate()
        async with db.session() as session:
            key = await create_api_key(session, "bench", ("sessions",))
        await db.close()
        with FakeAgent() as agent:
            async with (
                serving(settings, FakeRuntime(settings, agent), viewer_path=FakeViewerPath()) as (
                    base,
                    _,
                ),
                httpx.AsyncClient(trust_env=False) as http,
                async_playwright() as p,
            ):
                started = await http.post(
                    base + "/api/auth/start",
                    json={"userId": "bench", "provider": "codex"},
                    headers={"Authorization": f"Bearer {key}"},
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
                await page.goto(f"{base}{link.path}?{link.query}")
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
