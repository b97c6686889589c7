"""One guest cannot take the egress proxy from the others, and no tunnel outlives its grant:
a per-guest cap on open connections (a 10,000-connection flood is refused while the
proxy's tasks and memory stay flat and another guest gets through), a total cap, an idle
timeout on tunnels, and revocation that closes a guest's tunnels at once. Real sockets on
loopback; the guests are 127.0.0.2 and 127.0.0.3."""

from __future__ import annotations

import asyncio
import gc
import time

from tests.network.egress_helpers import (
    GUEST_A,
    GUEST_B,
    allowance,
    ask,
    closed,
    connect,
    echo,
    origin,
    running_proxy,
    tunnel,
)

CAP = 8
FLOOD = 10_000
BATCH = 250


async def attempt(port: int, source: str) -> bytes:
    """One connection from ``source`` that sends nothing and reads what it is told."""
    try:
        reader, writer = await connect(port, source)
    except OSError:
        return b"refused by the kernel"
    try:
        return await asyncio.wait_for(reader.read(), 5)
    except ConnectionResetError:
        return b"reset"
    finally:
        writer.close()


async def test_a_flood_from_one_guest_is_refused_and_stays_bounded() -> None:
    async with origin() as up:
        mapped = {f"allowed.test:{up.port}": "127.0.0.1"}
        target = f"allowed.test:{up.port}"
        settings = {"egress_hosts": mapped, "egress_max_connections": CAP}
        async with running_proxy(**settings) as (egress, port):
            for guest in (GUEST_A, GUEST_B):
                egress.grant(guest, allowance("allowed.test", ports={up.port}, session=guest))
            held = [await tunnel(port, target, GUEST_A) for _ in range(CAP)]
            assert egress.open_connections(GUEST_A) == CAP
            tasks_before = len(asyncio.all_tasks())
            gc.collect()
            objects_before = len(gc.get_objects())
            refused = 0
            started = time.monotonic()
            for batch in range(FLOOD // BATCH):
                answers = await asyncio.gather(*(attempt(port, GUEST_A) for _ in range(BATCH)))
                refused += sum(a.startswith(b"HTTP/1.1 429 ") for a in answers)
                assert egress.open_connections(GUEST_A) == CAP  # the cap holds
                # nothing piles up (a few tasks of the other guest's tunnel may be closing)
                assert len(asyncio.all_tasks()) <= tasks_before + 10
                if batch == FLOOD // BATCH // 2:  # mid-flood, the other guest gets through
                    reader, writer = await tunnel(port, target, GUEST_B)
                    writer.close()
            elapsed = time.monotonic() - started
            assert refused == FLOOD, f"{FLOOD - refused} attempts were not answered 429"
            gc.collect()
            grown = len(gc.get_objects()) - objects_before
            assert grown < 2_000, f"{grown} objects more after the flood"
            for reader, writer in held:  # the guest's own tunnels still work
                await echo(reader, writer, b"still here")
                writer.close()
            reader, writer = await tunnel(port, target, GUEST_B)
            writer.close()
    print(f"flood: {FLOOD} refused in {elapsed:.1f} s ({FLOOD / elapsed:.0f}/s)")


async def test_the_cap_counts_connections_still_sending_their_head() -> None:
    """Slowloris: connections that never finish their request hold the guest's slots (and
    only its own) until the head deadline frees them."""
    async with running_proxy(egress_max_connections=3) as (egress, port):
        egress.grant(GUEST_A, allowance("allowed.test"))
        egress.head_timeout = 0.5
        slow = [await connect(port, GUEST_A) for _ in range(3)]
        await asyncio.sleep(0.05)
        assert (await attempt(port, GUEST_A)).startswith(b"HTTP/1.1 429 ")
        other = await ask(port, "CONNECT elsewhere.test:443 HTTP/1.1\r\n\r\n", GUEST_B)
        assert other.startswith("HTTP/1.1 403 ")  # served (and refused for its own reason)
        for reader, writer in slow:
            assert await closed(reader, 3)
            writer.close()
        await asyncio.sleep(0.05)
        assert egress.open_connections() == 0


async def test_the_total_cap_holds_across_guests() -> None:
    async with running_proxy() as (egress, port):
        egress.total = 2
        slow = [await connect(port, GUEST_A), await connect(port, GUEST_B)]
        await asyncio.sleep(0.05)
        assert (await attempt(port, "127.0.0.4")).startswith(b"HTTP/1.1 503 ")
        for _, writer in slow:
            writer.close()


async def test_a_silent_tunnel_is_closed_and_a_busy_one_is_not() -> None:
    async with origin() as up:
        mapped = {f"allowed.test:{up.port}": "127.0.0.1"}
        async with running_proxy(egress_hosts=mapped, egress_idle_timeout=0.3) as (egress, port):
            egress.grant(GUEST_A, allowance("allowed.test", ports={up.port}))
            reader, writer = await tunnel(port, f"allowed.test:{up.port}")
            started = time.monotonic()
            assert await closed(reader, 3)
            silent_for = time.monotonic() - started
            assert 0.25 < silent_for < 2.0, silent_for
            writer.close()
            await asyncio.sleep(0.05)
            assert up.open == 0 and egress.open_connections() == 0
            # one second of a download, a byte every 0.1 s, the guest sending nothing
            reader, writer = await connect(port)
            writer.write(f"CONNECT allowed.test:{up.port} HTTP/1.1\r\n\r\ndrip".encode())
            await writer.drain()
            await reader.readuntil(b"\r\n\r\n")
            assert await asyncio.wait_for(reader.read(), 5) == b"." * 10
            writer.close()


async def test_revoking_closes_the_guests_tunnels_at_once() -> None:
    async with origin() as up:
        mapped = {f"allowed.test:{up.port}": "127.0.0.1"}
        target = f"allowed.test:{up.port}"
        async with running_proxy(egress_hosts=mapped) as (egress, port):
            egress.grant(GUEST_A, allowance("allowed.test", ports={up.port}, session="a"))
            egress.grant(GUEST_B, allowance("allowed.test", ports={up.port}, session="b"))
            mine = [await tunnel(port, target, GUEST_A) for _ in range(3)]
            slow = await connect(port, GUEST_A)  # still sending its head: closed too
            others = await tunnel(port, target, GUEST_B)
            await asyncio.sleep(0.05)
            started = time.monotonic()
            assert egress.revoke(GUEST_A) == 4
            for reader, _ in [*mine, slow]:
                assert await closed(reader, 2)
            took = time.monotonic() - started
            await asyncio.sleep(0.05)
            assert egress.open_connections(GUEST_A) == 0 and up.open == 1  # upstream too
            await echo(*others, b"unaffected")
            answer = await ask(port, f"CONNECT {target} HTTP/1.1\r\n\r\n", GUEST_A)
            assert answer.startswith("HTTP/1.1 403 ") and "no sign-in" in answer
            assert egress.revoke(GUEST_A) == 0  # twice is fine
            for _, writer in [*mine, slow, others]:
                writer.close()
    print(f"revoke: 4 connections closed in {took * 1000:.1f} ms")


async def test_a_new_session_on_a_reused_address_gets_no_old_tunnels() -> None:
    async with origin() as up:
        mapped = {f"allowed.test:{up.port}": "127.0.0.1"}
        async with running_proxy(egress_hosts=mapped) as (egress, port):
            egress.grant(GUEST_A, allowance("allowed.test", ports={up.port}, session="old"))
            reader, writer = await tunnel(port, f"allowed.test:{up.port}")
            egress.grant(GUEST_A, allowance("allowed.test", ports={up.port}, session="old"))
            await echo(reader, writer, b"same session: kept")
            egress.grant(GUEST_A, allowance("allowed.test", ports={up.port}, session="new"))
            assert await closed(reader, 2)
            writer.close()
