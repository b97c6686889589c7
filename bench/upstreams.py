"""Each user's egress identity, against the real upstream proxies of the tests (tinyproxy with
a login, Dante's SOCKS5, each in its own network namespace):

- check: fetching the check URL through an upstream (what a guest's start waits for when the
  user's last good check is older than ``egress_check_interval``), per upstream;
- tunnel: a guest's request through the controller's egress proxy and the user's upstream to
  the origin behind it, answer read (what every connection of a sign-in's page loads pays;
  the origin is reachable only through the upstreams, so there is no direct figure to set
  beside it).

    .venv/bin/python -m bench.upstreams [--rounds 50]

Prints the figures and saves them to bench/results/upstreams.json.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import save, summary
from master_controller.network.egress import Allowance
from master_controller.network.upstream import Upstream, exit_address, parse
from tests.network.egress_helpers import GUEST_A, running_proxy
from tests.network.upstreams import CHECK_URL, ORIGIN, USERNAME, real_upstreams

RESULTS = Path(__file__).parent / "results" / "upstreams.json"


async def _checks(upstream: Upstream, rounds: int) -> list[float]:
    took = []
    for _ in range(rounds):
        started = time.monotonic()
        await exit_address(upstream, CHECK_URL)
        took.append((time.monotonic() - started) * 1000)
    return took


async def _tunnels(upstream: Upstream, rounds: int) -> list[float]:
    took = []
    async with running_proxy() as (egress, port):
        egress.grant(GUEST_A, Allowance("bench", (ORIGIN,), frozenset({80}), upstream=upstream))
        for _ in range(rounds):
            started = time.monotonic()
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, local_addr=(GUEST_A, 0)
            )
            writer.write(f"GET http://{ORIGIN}/ HTTP/1.1\r\nHost: {ORIGIN}\r\n\r\n".encode())
            answer = await reader.read()
            writer.close()
            assert b" 200 " in answer.split(b"\r\n", 1)[0], answer[:80]
            took.append((time.monotonic() - started) * 1000)
    return took


async def main(rounds: int) -> dict[str, Any]:
    figures: dict[str, Any] = {
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "rounds": rounds,
    }
    with tempfile.TemporaryDirectory() as tmp, real_upstreams(Path(tmp)) as ups:
        http = parse(ups.http.url).with_credentials(USERNAME, ups.password)
        socks = parse(ups.socks.url)
        for label, upstream in (("http_connect_tinyproxy", http), ("socks5_dante", socks)):
            figures[label] = {
                "check_ms": summary(await _checks(upstream, rounds)),
                "request_through_egress_proxy_ms": summary(await _tunnels(upstream, rounds)),
            }
    return figures


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=50)
    args = parser.parse_args()
    save(asyncio.run(main(args.rounds)), RESULTS)
