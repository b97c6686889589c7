"""The guest firewall's table is installed by one caller at a time, from any event loop
(tools and tests run several, one after another)."""

from __future__ import annotations

import asyncio
import os

import pytest

from master_controller.network import firewall


@pytest.mark.skipif(os.geteuid() != 0 or not firewall.available(), reason="needs root and nft")
def test_concurrent_installs_work_from_one_loop_after_another() -> None:
    async def two_at_once() -> list[bool]:
        return list(await asyncio.gather(firewall.ensure_isolation(), firewall.ensure_isolation()))

    for _ in range(3):  # a lock bound to the first loop would refuse the second
        replaced = asyncio.run(two_at_once())
        assert replaced.count(True) <= 1  # never replaced twice over
