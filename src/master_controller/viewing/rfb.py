"""A small RFB (VNC) client: enough of RFC 6143 to prove a viewer would see the screen.

It performs the version 3.8 handshake with VNC authentication, asks for the whole
framebuffer in Raw encoding and assembles it. The transport is any byte stream with
``read_exactly`` and ``write`` (a TCP stream, or a WebSocket through websockify).

The server is a guest, and a guest is hostile by assumption: every length and size it
sends is checked against a bound *before* anything is allocated or read for it, and a claim
past a bound is a :class:`ProbeError` naming the claim. The bounds are generous for a real
desktop (a 4K screen fits) and tiny next to what the wire format lets a server claim
(a 65535x65535 screen is 16 GiB; a name or a reason may claim 4 GiB).
"""

from __future__ import annotations

import struct
import zlib
from collections import Counter
from dataclasses import dataclass
from typing import Protocol

from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, modes

from master_controller.errors import ProbeError

VERSION_38 = b"RFB 003.008\n"
SECURITY_NONE = 1
SECURITY_VNC = 2
ENCODING_RAW = 0
# 32 bits per pixel, depth 24, little-endian, true colour, 8 bits per channel: B, G, R, pad.
PIXEL_FORMAT = struct.pack(">BBBBHHHBBB3x", 32, 24, 0, 1, 255, 255, 255, 16, 8, 0)
BYTES_PER_PIXEL = 4

# Bounds on what a server may claim. Guests draw 1280x800; 3840x2160 (4K, 31.6 MiB) fits.
MAX_DIMENSION = 8192
MAX_FRAMEBUFFER_BYTES = 32 * 1024 * 1024
MAX_NAME_BYTES = 4096  # the desktop name in ServerInit; x11vnc sends "host:1"-like names
MAX_REASON_BYTES = 4096  # kept of a failure reason; the connection ends right after
MAX_CUT_TEXT_BYTES = 1024 * 1024  # a ServerCutText we skip (read in chunks, never kept)
MAX_COLOUR_MAP = 256  # we ask for true colour; a colour map beyond 8 bits is made up
DISCARD_CHUNK = 64 * 1024


class ByteStream(Protocol):
    async def read_exactly(self, n: int) -> bytes: ...

    async def write(self, data: bytes) -> None: ...


def vnc_auth_response(password: str, challenge: bytes) -> bytes:
    """DES-encrypt the challenge with the password, bits of each key byte reversed (the
    VNC quirk). Single DES is TripleDES with the same key three times."""
    key = password.encode("latin-1")[:8].ljust(8, b"\0")
    key = bytes(int(f"{b:08b}"[::-1], 2) for b in key)
    # ECB on one 16-byte challenge is what the protocol prescribes
    encryptor = Cipher(TripleDES(key * 3), modes.ECB()).encryptor()  # noqa: S305
    return encryptor.update(challenge) + encryptor.finalize()


@dataclass
class ServerInfo:
    version: bytes
    security_types: list[int]
    width: int
    height: int
    name: str


@dataclass
class ServerInit:
    """The server's ServerInit message, checked against the bounds above."""

    width: int
    height: int
    pixel_format: bytes
    name: bytes

    def encode(self) -> bytes:
        return (
            struct.pack(">HH", self.width, self.height)
            + self.pixel_format
            + struct.pack(">I", len(self.name))
            + self.name
        )


def check_screen(width: int, height: int) -> None:
    """Refuse a framebuffer size a real desktop does not have (before allocating for it)."""
    size = width * height * BYTES_PER_PIXEL
    if not (0 < width <= MAX_DIMENSION and 0 < height <= MAX_DIMENSION) or (
        size > MAX_FRAMEBUFFER_BYTES
    ):
        raise ProbeError(
            f"the VNC server claims a {width}x{height} screen ({size} bytes of pixels; "
            f"at most {MAX_DIMENSION}x{MAX_DIMENSION} and {MAX_FRAMEBUFFER_BYTES} bytes)"
        )


async def read_server_init(stream: ByteStream) -> ServerInit:
    """Read and check ServerInit (the answer to ClientInit): screen size and name length
    are refused past their bounds before the name is read."""
    width, height = struct.unpack(">HH", await stream.read_exactly(4))
    check_screen(width, height)
    pixel_format = await stream.read_exactly(16)
    (name_len,) = struct.unpack(">I", await stream.read_exactly(4))
    if name_len > MAX_NAME_BYTES:
        raise ProbeError(
            f"the VNC server claims a desktop name of {name_len} bytes (at most {MAX_NAME_BYTES})"
        )
    name = await stream.read_exactly(name_len)
    return ServerInit(width, height, pixel_format, name)


async def read_reason(stream: ByteStream) -> str:
    """A failure reason (a length, then text). At most MAX_REASON_BYTES are read and kept:
    the connection is abandoned right after, so the rest is never read (a server claiming
    a 4 GiB reason gets 4 KiB of attention)."""
    (length,) = struct.unpack(">I", await stream.read_exactly(4))
    text = (await stream.read_exactly(min(length, MAX_REASON_BYTES))).decode(errors="replace")
    return text + (
        f" [... {length - MAX_REASON_BYTES} more bytes]" if length > MAX_REASON_BYTES else ""
    )


async def discard(stream: ByteStream, n: int) -> None:
    """Read and drop ``n`` bytes in chunks: skipping never allocates what it skips."""
    while n > 0:
        chunk = min(n, DISCARD_CHUNK)
        await stream.read_exactly(chunk)
        n -= chunk


@dataclass
class Frame:
    width: int
    height: int
    pixels: bytearray  # BGRX, 4 bytes per pixel, row-major

    def stats(self, step: int = 7) -> tuple[int, float]:
        """(distinct colours, share of the most common colour) over a sample of pixels (every
        ``step``-th). Counted as whole 32-bit pixels with the padding byte zeroed: pixel by pixel
        in Python, a 1280x800 frame took 0.15-0.35 s (a readiness check ran it on the loop)."""
        sample = bytearray(memoryview(self.pixels).cast("I")[::step].tobytes())
        sample[3::4] = bytes(len(sample) // 4)  # X of BGRX: not part of the colour
        counts: Counter[int] = Counter(memoryview(sample).cast("I"))
        total = sum(counts.values()) or 1
        return len(counts), counts.most_common(1)[0][1] / total if counts else 1.0

    def is_blank(self) -> bool:
        """Blank: one colour covers more than 99% of the screen (a black screen, say)."""
        _, dominant = self.stats()
        return dominant > 0.99

    def png(self) -> bytes:
        """The frame as a PNG (for people to look at what verification saw)."""
        rows = bytearray()
        stride = self.width * 4
        for y in range(self.height):
            rows.append(0)
            line = self.pixels[y * stride : (y + 1) * stride]
            rgb = bytearray(self.width * 3)
            rgb[0::3] = line[2::4]
            rgb[1::3] = line[1::4]
            rgb[2::3] = line[0::4]
            rows += rgb

        def chunk(kind: bytes, data: bytes) -> bytes:
            body = kind + data
            return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

        header = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)
        return (
            b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(bytes(rows), 6))
            + chunk(b"IEND", b"")
        )


class RFBClient:
    def __init__(self, stream: ByteStream) -> None:
        self.stream = stream
        self.info: ServerInfo | None = None
        self.version = b""

    async def handshake(self, password: str | None) -> ServerInfo:
        """Version 3.8, authentication, shared ClientInit; raises ProbeError saying which part
        failed. Without a password only a server offering no authentication is accepted (the
        controller's proxy, which authenticates to the guest itself)."""
        types = await self.authenticate(password)
        return await self.initialise(types)

    async def authenticate(self, password: str | None) -> list[int]:
        """Version and security handshake up to a successful SecurityResult."""
        version = await self.stream.read_exactly(12)
        if not version.startswith(b"RFB "):
            raise ProbeError(f"not an RFB server: greeting {version!r}")
        if version < VERSION_38:
            raise ProbeError(f"server speaks {version.strip().decode()}, 3.8 is required")
        self.version = version.strip()
        await self.stream.write(VERSION_38)
        (count,) = await self.stream.read_exactly(1)
        if count == 0:
            raise ProbeError(f"server refused the connection: {await self._reason()}")
        types = list(await self.stream.read_exactly(count))
        if password is None:
            if SECURITY_NONE not in types:
                raise ProbeError(f"server requires authentication (security types {types})")
            await self.stream.write(bytes([SECURITY_NONE]))
        else:
            if SECURITY_VNC not in types:
                raise ProbeError(f"server offers no VNC authentication (security types {types})")
            await self.stream.write(bytes([SECURITY_VNC]))
            challenge = await self.stream.read_exactly(16)
            await self.stream.write(vnc_auth_response(password, challenge))
        (result,) = struct.unpack(">I", await self.stream.read_exactly(4))
        if result != 0:
            raise ProbeError(f"VNC authentication failed: {await self._reason()}")
        return types

    async def initialise(self, security_types: list[int]) -> ServerInfo:
        """ClientInit (shared), a checked ServerInit, then our pixel format and encodings."""
        await self.stream.write(b"\x01")  # shared: other viewers stay connected
        init = await read_server_init(self.stream)
        name = init.name.decode(errors="replace")
        self.info = ServerInfo(self.version, security_types, init.width, init.height, name)
        await self.stream.write(b"\x00\x00\x00\x00" + PIXEL_FORMAT)
        await self.stream.write(struct.pack(">BxHi", 2, 1, ENCODING_RAW))
        return self.info

    async def _reason(self) -> str:
        return await read_reason(self.stream)

    async def frame(self, since: Frame | None = None) -> Frame:
        """Request and assemble one complete framebuffer. With ``since`` (this connection's
        last frame), only what changed is asked for (an incremental update, which the server
        sends once something changes) and laid over a copy of it: a guest still drawing its
        first screen is not made to send whole screens again and again. Rectangles must lie
        inside the screen ServerInit announced (already bounded), so memory stays within two
        framebuffers plus one row."""
        if self.info is None:
            raise ProbeError("handshake first")
        w, h = self.info.width, self.info.height
        incremental = since is not None and (since.width, since.height) == (w, h)
        await self.stream.write(struct.pack(">BBHHHH", 3, int(incremental), 0, 0, w, h))
        pixels = (
            bytearray(since.pixels)
            if since is not None and incremental
            else bytearray(w * h * BYTES_PER_PIXEL)
        )
        while True:
            (kind,) = await self.stream.read_exactly(1)
            if kind == 0:
                break
            await self._skip_message(kind)
        (rects,) = struct.unpack(">xH", await self.stream.read_exactly(3))
        for _ in range(rects):
            x, y, rw, rh, encoding = struct.unpack(">HHHHi", await self.stream.read_exactly(12))
            if encoding != ENCODING_RAW:
                raise ProbeError(f"server sent encoding {encoding}, only Raw was asked for")
            if x + rw > w or y + rh > h:
                raise ProbeError(
                    f"the VNC server sent a {rw}x{rh} rectangle at ({x},{y}), outside its "
                    f"{w}x{h} screen"
                )
            stride = rw * BYTES_PER_PIXEL
            for row in range(rh):  # row by row: never a second framebuffer-sized buffer
                start = ((y + row) * w + x) * BYTES_PER_PIXEL
                pixels[start : start + stride] = await self.stream.read_exactly(stride)
        return Frame(w, h, pixels)

    async def _skip_message(self, kind: int) -> None:
        if kind == 1:  # SetColourMapEntries
            first, n = struct.unpack(">xHH", await self.stream.read_exactly(5))
            if first + n > MAX_COLOUR_MAP:
                raise ProbeError(
                    f"the VNC server sent colour map entries {first}..{first + n} "
                    f"(at most {MAX_COLOUR_MAP}, and true colour was asked for)"
                )
            await discard(self.stream, n * 6)
        elif kind == 2:  # Bell
            return
        elif kind == 3:  # ServerCutText
            (length,) = struct.unpack(">3xI", await self.stream.read_exactly(7))
            if length > MAX_CUT_TEXT_BYTES:
                raise ProbeError(
                    f"the VNC server sent clipboard text of {length} bytes "
                    f"(at most {MAX_CUT_TEXT_BYTES})"
                )
            await discard(self.stream, length)
        else:
            raise ProbeError(f"unexpected RFB server message type {kind}")


async def accept_without_auth(viewer: ByteStream) -> None:
    """Server side of the version and security handshake, offering no authentication: the
    controller's proxy has authenticated to the guest already, so the viewer (who proved
    itself with a ticket) never sees the guest's VNC password."""
    await viewer.write(VERSION_38)
    version = await viewer.read_exactly(12)
    if version != VERSION_38:
        raise ProbeError(f"viewer speaks {version!r}; RFB 3.8 is required")
    await viewer.write(bytes([1, SECURITY_NONE]))
    (choice,) = await viewer.read_exactly(1)
    if choice != SECURITY_NONE:
        raise ProbeError(f"viewer chose security type {choice}, only None is offered")
    await viewer.write(struct.pack(">I", 0))
