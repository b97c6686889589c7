"""The RFB client against a hostile server: every size a server claims is checked before
anything is read or allocated for it.

The server is scripted bytes behind the client's ByteStream interface; the stream records
the largest read asked of it, so a test sees the client never tried to take what a claim
announced (a 4 GiB name, a 16 GiB screen), and tracemalloc shows nothing big was allocated.
"""

from __future__ import annotations

import struct
import tracemalloc
from collections.abc import Awaitable, Callable

import pytest

from master_controller.errors import ProbeError
from master_controller.viewing.rfb import (
    DISCARD_CHUNK,
    MAX_CUT_TEXT_BYTES,
    MAX_NAME_BYTES,
    MAX_REASON_BYTES,
    PIXEL_FORMAT,
    VERSION_38,
    RFBClient,
)

FOUR_GIB = 2**32 - 1
SMALL = 1024 * 1024  # what any of these attacks may make the client allocate, at most


class ScriptedServer:
    """A server that says exactly ``script`` and then hangs up."""

    def __init__(self, script: bytes) -> None:
        self.script = bytearray(script)
        self.written = bytearray()
        self.largest_read = 0

    async def read_exactly(self, n: int) -> bytes:
        self.largest_read = max(self.largest_read, n)
        if n > len(self.script):
            raise ProbeError(f"server hung up ({n} bytes asked, {len(self.script)} left)")
        data = bytes(self.script[:n])
        del self.script[:n]
        return data

    async def write(self, data: bytes) -> None:
        self.written += data


def greeting(result: int = 0) -> bytes:
    """Version, one security type (None), and a SecurityResult."""
    return VERSION_38 + bytes([1, 1]) + struct.pack(">I", result)


def server_init(width: int, height: int, name: bytes = b"guest:1", name_len: int | None = None):  # type: ignore[no-untyped-def]
    length = len(name) if name_len is None else name_len
    return struct.pack(">HH", width, height) + PIXEL_FORMAT + struct.pack(">I", length) + name


def update(*rects: tuple[int, int, int, int, bytes]) -> bytes:
    out = struct.pack(">BxH", 0, len(rects))
    for x, y, w, h, pixels in rects:
        out += struct.pack(">HHHHi", x, y, w, h, 0) + pixels
    return out


async def attack(server: ScriptedServer, run: Callable[[RFBClient], Awaitable[object]]) -> str:
    """Run the client against ``server``; the ProbeError's reason, and the allocation peak
    checked to stay small."""
    tracemalloc.start()
    try:
        with pytest.raises(ProbeError) as refused:
            await run(RFBClient(server))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < SMALL, f"the client allocated {peak} bytes"
    return refused.value.reason


async def handshake(client: RFBClient) -> object:
    return await client.handshake(None)


async def handshake_and_frame(client: RFBClient) -> object:
    await client.handshake(None)
    return await client.frame()


async def test_a_real_sized_screen_is_assembled() -> None:
    red, blue = b"\x00\x00\xff\x00", b"\xff\x00\x00\x00"
    server = ScriptedServer(
        greeting() + server_init(4, 2) + update((0, 0, 4, 1, red * 4), (1, 1, 2, 1, blue * 2))
    )
    client = RFBClient(server)
    info = await client.handshake(None)
    assert (info.width, info.height, info.name) == (4, 2, "guest:1")
    frame = await client.frame()
    assert frame.pixels == bytearray(red * 4 + b"\0" * 4 + blue * 2 + b"\0" * 4)


async def test_an_incremental_update_is_laid_over_the_last_frame() -> None:
    red, blue = b"\x00\x00\xff\x00", b"\xff\x00\x00\x00"
    server = ScriptedServer(
        greeting()
        + server_init(4, 2)
        + update((0, 0, 4, 2, red * 8))
        + update((1, 1, 2, 1, blue * 2))  # only what changed
    )
    client = RFBClient(server)
    await client.handshake(None)
    first = await client.frame()
    second = await client.frame(since=first)
    assert second.pixels == bytearray(red * 4 + red + blue * 2 + red)
    assert first.pixels == bytearray(red * 8)  # the last frame is left as it was
    requests = [server.written[i : i + 10] for i in range(len(server.written) - 9)]
    full = struct.pack(">BBHHHH", 3, 0, 0, 0, 4, 2)
    changes = struct.pack(">BBHHHH", 3, 1, 0, 0, 4, 2)
    assert requests.count(full) == 1 and requests.count(changes) == 1


async def test_a_4k_screen_is_accepted() -> None:
    info = await RFBClient(ScriptedServer(greeting() + server_init(3840, 2160))).handshake(None)
    assert (info.width, info.height) == (3840, 2160)


@pytest.mark.parametrize(
    ("width", "height"),
    [(65535, 65535), (8192, 8192), (0, 800), (1280, 0), (65535, 1)],
)
async def test_a_screen_claim_past_the_bounds_is_refused(width: int, height: int) -> None:
    """65535x65535 would be a 16 GiB framebuffer; 8192x8192 is within each dimension but
    256 MiB in all; a zero dimension is no screen."""
    server = ScriptedServer(greeting() + server_init(width, height) + update())
    reason = await attack(server, handshake_and_frame)
    assert f"claims a {width}x{height} screen" in reason


async def test_a_4gib_desktop_name_is_refused_unread() -> None:
    server = ScriptedServer(greeting() + server_init(1280, 800, b"x" * 100, name_len=FOUR_GIB))
    reason = await attack(server, handshake)
    assert f"desktop name of {FOUR_GIB} bytes" in reason
    assert server.largest_read <= MAX_NAME_BYTES


async def test_a_4gib_refusal_reason_is_cut_short() -> None:
    """A server refusing the connection (no security types) with a reason claiming 4 GiB:
    4 KiB of it is read and kept, the rest never asked for."""
    server = ScriptedServer(VERSION_38 + b"\x00" + struct.pack(">I", FOUR_GIB) + b"go away " * 1000)
    reason = await attack(server, handshake)
    assert reason.startswith("server refused the connection: go away")
    assert f"{FOUR_GIB - MAX_REASON_BYTES} more bytes" in reason
    assert server.largest_read <= MAX_REASON_BYTES


async def test_a_4gib_authentication_failure_reason_is_cut_short() -> None:
    server = ScriptedServer(greeting(result=1) + struct.pack(">I", FOUR_GIB) + b"no" * 5000)
    reason = await attack(server, handshake)
    assert reason.startswith("VNC authentication failed: nonono")
    assert server.largest_read <= MAX_REASON_BYTES


async def test_a_4gib_clipboard_is_refused_and_a_real_one_skipped() -> None:
    cut = struct.pack(">B3xI", 3, FOUR_GIB) + b"x" * 1000
    server = ScriptedServer(greeting() + server_init(2, 1) + cut)
    reason = await attack(server, handshake_and_frame)
    assert f"clipboard text of {FOUR_GIB} bytes" in reason
    # a clipboard within the bound is skipped in chunks, and the frame still arrives
    text = b"t" * (MAX_CUT_TEXT_BYTES // 2)
    pixels = b"\x10\x20\x30\x00" * 2
    server = ScriptedServer(
        greeting()
        + server_init(2, 1)
        + struct.pack(">B3xI", 3, len(text))
        + text
        + update((0, 0, 2, 1, pixels))
    )
    client = RFBClient(server)
    await client.handshake(None)
    assert (await client.frame()).pixels == bytearray(pixels)
    assert server.largest_read <= DISCARD_CHUNK


@pytest.mark.parametrize(
    ("x", "y", "w", "h"),
    [(0, 0, 65535, 65535), (63, 0, 2, 1), (0, 31, 1, 2), (65535, 65535, 1, 1)],
)
async def test_a_rectangle_outside_the_screen_is_refused(x: int, y: int, w: int, h: int) -> None:
    server = ScriptedServer(greeting() + server_init(64, 32) + update((x, y, w, h, b"\x00" * 64)))
    reason = await attack(server, handshake_and_frame)
    assert f"a {w}x{h} rectangle at ({x},{y}), outside its 64x32 screen" in reason


async def test_colour_map_entries_are_bounded() -> None:
    entries = struct.pack(">BxHH", 1, 200, 65335)
    server = ScriptedServer(greeting() + server_init(2, 1) + entries + b"\x00" * 6 * 100)
    reason = await attack(server, handshake_and_frame)
    assert "colour map entries 200..65535" in reason
    # a small colour map is skipped
    pixels = b"\x01\x02\x03\x00" * 2
    server = ScriptedServer(
        greeting()
        + server_init(2, 1)
        + struct.pack(">BxHH", 1, 0, 16)
        + b"\x00" * 96
        + update((0, 0, 2, 1, pixels))
    )
    client = RFBClient(server)
    await client.handshake(None)
    assert (await client.frame()).pixels == bytearray(pixels)
