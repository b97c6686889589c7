"""What a TLS reverse proxy costs the viewer: the viewer's WebSocket to one session straight
to the controller (ws://), through nginx and through Caddy (wss://, the examples in
docs/reverse-proxy/, see tests/web/reverse_proxies.py): time to open a viewer (TCP, TLS,
WebSocket upgrade, RFB handshake, first full frame) and full raw frames' latency and
throughput.

    flock /tmp/mc-integration.lock .venv/bin/python -m bench.reverse_proxy [--frames N]

Needs a promoted image in the data dir (run bench/images.py first, or it is built).
Prints the figures and saves them to bench/results/reverse-proxy.json.
"""

from __future__ import annotations

import argparse
import asyncio
import ssl
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from websockets.asyncio.client import connect
from websockets.typing import Origin, Subprotocol

from bench import save, summary
from bench.controller import ensure_image
from master_controller.settings import Settings
from master_controller.viewing.guest_socket import (
    MAX_GUEST_MESSAGE,
    MAX_GUEST_QUEUE,
    WebSocketStream,
)
from master_controller.viewing.rfb import RFBClient
from master_controller.web.paths import VIEWER_COOKIE, viewer_path
from tests.web.reverse_proxies import SERVER_NAME, Proxied, behind_proxies

RESULTS = Path(__file__).parent / "results" / "reverse-proxy.json"


@asynccontextmanager
async def viewer(
    url: str, origin: str, cookie: str, context: ssl.SSLContext | None
) -> AsyncIterator[RFBClient]:
    """A viewer's RFB client over the session's WebSocket at ``url`` (on loopback)."""
    async with connect(
        url,
        host="127.0.0.1",
        ssl=context,
        origin=Origin(origin),
        additional_headers={"Cookie": f"{VIEWER_COOKIE}={cookie}"},
        subprotocols=[Subprotocol("binary")],
        proxy=None,
        max_size=MAX_GUEST_MESSAGE,
        max_queue=MAX_GUEST_QUEUE,
        compression=None,
        open_timeout=15,
    ) as ws:
        client = RFBClient(WebSocketStream(ws, 30))
        await client.handshake(None)
        yield client


async def measure_path(
    url: str, origin: str, cookie: str, context: ssl.SSLContext | None, opens: int, frames: int
) -> dict[str, Any]:
    to_first_frame = []
    for _ in range(opens):
        started = time.monotonic()
        async with viewer(url, origin, cookie, context) as client:
            await client.frame()
            to_first_frame.append(time.monotonic() - started)
    per_frame, total = [], 0
    async with viewer(url, origin, cookie, context) as client:
        await client.frame()  # warm up
        started = time.monotonic()
        for _ in range(frames):
            before = time.monotonic()
            frame = await client.frame()
            per_frame.append(time.monotonic() - before)
            total += len(frame.pixels)
        seconds = time.monotonic() - started
    return {
        "open_to_first_frame_ms": summary([s * 1000 for s in to_first_frame]),
        "full_frame_ms": summary([s * 1000 for s in per_frame]),
        "mib_per_second": round(total / 2**20 / seconds, 1),
    }


def measure(proxied: Proxied, opens: int, frames: int) -> dict[str, Any]:
    cookie = proxied.viewer_cookie()
    socket_path = viewer_path(proxied.session_id) + "/websock"
    context = proxied.tls.client_context()
    paths = {
        "direct": (proxied.ctl.url.replace("http://", "ws://"), proxied.ctl.url, None),
        "nginx": (f"wss://{SERVER_NAME}:{proxied.nginx.https_port}", proxied.nginx.origin, context),
        "caddy": (f"wss://{SERVER_NAME}:{proxied.caddy.https_port}", proxied.caddy.origin, context),
    }
    figures: dict[str, Any] = {}
    for name, (base, origin, tls) in paths.items():
        figures[name] = asyncio.run(
            measure_path(base + socket_path, origin, cookie, tls, opens, frames)
        )
    for name in ("nginx", "caddy"):
        figures[f"{name}_vs_direct_throughput"] = round(
            figures[name]["mib_per_second"] / figures["direct"]["mib_per_second"], 2
        )
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", type=Path, default=Path("/var/lib/master-controller-bench"))
    parser.add_argument("--opens", type=int, default=10)
    parser.add_argument("--frames", type=int, default=40)
    args = parser.parse_args()
    settings = Settings(data_dir=args.data_dir, guest_network="10.213.244.0/22")
    figures: dict[str, Any] = {
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "image": ensure_image(settings),
        "frame": "1280x800, 32 bpp raw",
    }
    with (
        tempfile.TemporaryDirectory() as work,
        behind_proxies(settings.data_dir, Path(work), str(settings.guest_network)) as proxied,
    ):
        proxied.session_id = proxied.ctl.ready_session("bench")
        figures.update(measure(proxied, args.opens, args.frames))
    save(figures, RESULTS)


if __name__ == "__main__":
    main()
