"""A hostile guest's services: a fake VNC server (RFB over TCP, as x11vnc, or over WebSocket,
as websockify) and a fake agent (HTTP), each misbehaving in one chosen way. Standard library
only, so the same file runs inside a real guest (as guest root, replacing x11vnc on 5900 or
the agent on 8080) and on loopback in fast tests.

    python3 hostile.py MODE HOST PORT [SECONDS] [tcp|ws]

VNC modes (RFB 3.8 with VNC authentication, any password; plain TCP unless "ws"):
    vnc-ok            a 64x32 screen, drawn in colours, answering every update request
    vnc-huge-screen   ServerInit claims 65535x65535 (a 16 GiB framebuffer)
    vnc-huge-name     ServerInit claims a 4 GiB desktop name, then sends name bytes
    vnc-huge-message  a good ServerInit, then 100 MB at once (over ws: one message)
    vnc-silent        a good ServerInit, then reads nothing (its socket buffers fill up)
    vnc-dribble       the RFB greeting one byte every SECONDS, forever
Agent modes (HTTP/1.1 on every path):
    agent-huge        a 100 MB body (Content-Length), sent in full
    agent-huge-chunked  the same without a length (chunked)
    agent-gzip        100 MB of JSON gzip-compressed to ~100 KB (a decompression bomb)
    agent-dribble     headers at once, then one body byte every SECONDS (slowloris)
    agent-list        a JSON list, not an object
    agent-deep        200 KB of nested brackets
"""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import socketserver
import struct
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager, suppress

HUGE = 100_000_000
CHUNK = b"x" * 65536
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
PIXEL_FORMAT = struct.pack(">BBBBHHHBBB3x", 32, 24, 0, 1, 255, 255, 255, 16, 8, 0)


class Gone(Exception):
    """The other side went away."""


class Plain:
    """RFB straight on the TCP connection (as x11vnc serves it)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = bytearray()

    def recv_exactly(self, n: int) -> bytes:
        data = bytearray()
        while len(data) < n:
            part = self.sock.recv(n - len(data))
            if not part:
                raise Gone
            data += part
        return bytes(data)

    def upgrade(self) -> None:
        """Nothing to upgrade."""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read(self, n: int) -> bytes:
        return self.recv_exactly(n)

    def send_huge(self) -> None:
        send_huge_body(self.sock)


class WebSocket(Plain):
    """The server side of RFC 6455, just enough for RFB: binary frames, pings answered."""

    def upgrade(self) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            part = self.sock.recv(4096)
            if not part:
                raise Gone
            head += part
        key = next(
            line.split(b":", 1)[1].strip()
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"sec-websocket-key:")
        )
        accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
        self.sock.sendall(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept + b"\r\nSec-WebSocket-Protocol: binary\r\n\r\n"
        )

    @staticmethod
    def header(length: int, opcode: int = 2) -> bytes:
        if length < 126:
            return bytes([0x80 | opcode, length])
        if length < 65536:
            return bytes([0x80 | opcode, 126]) + struct.pack(">H", length)
        return bytes([0x80 | opcode, 127]) + struct.pack(">Q", length)

    def send(self, data: bytes, opcode: int = 2) -> None:
        self.sock.sendall(self.header(len(data), opcode) + data)

    def send_huge(self) -> None:
        """One WebSocket message of HUGE bytes, sent in full (unless the peer hangs up)."""
        self.sock.sendall(WebSocket.header(HUGE))
        send_huge_body(self.sock)

    def read(self, n: int) -> bytes:
        """``n`` bytes of the RFB stream, across messages."""
        while len(self.buffer) < n:
            self.buffer += self._message()
        data = bytes(self.buffer[:n])
        del self.buffer[:n]
        return data

    def _message(self) -> bytes:
        while True:
            first, second = self.recv_exactly(2)
            length = second & 0x7F
            if length == 126:
                (length,) = struct.unpack(">H", self.recv_exactly(2))
            elif length == 127:
                (length,) = struct.unpack(">Q", self.recv_exactly(8))
            mask = self.recv_exactly(4) if second & 0x80 else b"\0\0\0\0"
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(self.recv_exactly(length)))
            opcode = first & 0x0F
            if opcode == 8:
                raise Gone
            if opcode == 9:
                self.send(payload, opcode=10)
                continue
            if opcode in (0, 1, 2):
                return payload


def rfb_handshake(ws: Plain) -> None:
    """Version 3.8, VNC authentication (any answer passes), then the shared flag."""
    ws.send(b"RFB 003.008\n")
    ws.read(12)
    ws.send(b"\x01\x02")  # one security type: VNC authentication
    ws.read(1)
    ws.send(os.urandom(16))
    ws.read(16)
    ws.send(struct.pack(">I", 0))
    ws.read(1)  # ClientInit


def server_init(width: int, height: int, name: bytes, name_len: int | None = None) -> bytes:
    length = len(name) if name_len is None else name_len
    return struct.pack(">HH", width, height) + PIXEL_FORMAT + struct.pack(">I", length) + name


def serve_screen(ws: Plain) -> None:
    """A 64x32 screen in stripes of colour, sent whole on every update request."""
    width, height = 64, 32
    ws.send(server_init(width, height, b"hostile:ok"))
    rows = b"".join(bytes([y * 8, 255 - y * 8, 128, 0]) * width for y in range(height))
    update = struct.pack(">BxH", 0, 1) + struct.pack(">HHHHi", 0, 0, width, height, 0) + rows
    sizes = {0: 19, 3: 9, 4: 7, 5: 5}  # bytes after the type, for fixed-size messages
    while True:
        (kind,) = ws.read(1)
        if kind == 2:  # SetEncodings
            (count,) = struct.unpack(">xH", ws.read(3))
            ws.read(4 * count)
        elif kind == 6:  # ClientCutText
            (length,) = struct.unpack(">3xI", ws.read(7))
            ws.read(length)
        else:
            ws.read(sizes[kind])
        if kind == 3:
            ws.send(update)


def send_huge_body(sock: socket.socket) -> None:
    """HUGE bytes, in chunks (unless the peer hangs up)."""
    for _ in range(HUGE // len(CHUNK)):
        sock.sendall(CHUNK)
    sock.sendall(CHUNK[: HUGE % len(CHUNK)])


def vnc(mode: str, sock: socket.socket, seconds: float, transport: str = "tcp") -> None:
    ws = WebSocket(sock) if transport == "ws" else Plain(sock)
    ws.upgrade()
    if mode == "vnc-dribble":
        while True:
            for byte in b"RFB 003.008\n":
                ws.send(bytes([byte]))
                time.sleep(seconds)
    rfb_handshake(ws)
    if mode == "vnc-ok":
        serve_screen(ws)
    elif mode == "vnc-huge-screen":
        ws.send(server_init(65535, 65535, b"hostile"))
    elif mode == "vnc-huge-name":
        ws.send(server_init(1280, 800, b"", name_len=2**32 - 1))
        for _ in range(HUGE // len(CHUNK)):
            ws.send(CHUNK)
    elif mode == "vnc-huge-message":
        ws.send(server_init(64, 32, b"hostile"))
        ws.send_huge()
    elif mode == "vnc-silent":
        ws.send(server_init(64, 32, b"hostile"))
        while True:
            time.sleep(3600)
    while True:  # until the client goes: closing first could reset what it has not read
        ws.read(1)


def http_answer(status: str, headers: dict[str, str], body: bytes = b"") -> bytes:
    lines = [f"HTTP/1.1 {status}", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def gzip_bomb() -> bytes:
    """HUGE bytes of JSON, gzip-compressed piece by piece (never held whole)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)  # 31: the gzip container
    parts = [packer.compress(b'{"a": "')]
    spaces = b" " * len(CHUNK)
    parts += [packer.compress(spaces) for _ in range(HUGE // len(CHUNK))]
    return b"".join([*parts, packer.compress(b'"}'), packer.flush()])


def agent(mode: str, sock: socket.socket, seconds: float) -> None:
    head = b""
    while b"\r\n\r\n" not in head:
        part = sock.recv(4096)
        if not part:
            return
        head += part
    json_type = {"Content-Type": "application/json"}
    if mode == "agent-huge":
        sock.sendall(http_answer("200 OK", {**json_type, "Content-Length": str(HUGE)}))
        send_huge_body(sock)
    elif mode == "agent-huge-chunked":
        sock.sendall(http_answer("200 OK", {**json_type, "Transfer-Encoding": "chunked"}))
        for _ in range(HUGE // len(CHUNK)):
            sock.sendall(b"%x\r\n" % len(CHUNK) + CHUNK + b"\r\n")
        sock.sendall(b"0\r\n\r\n")
    elif mode == "agent-gzip":
        body = gzip_bomb()
        headers = {**json_type, "Content-Encoding": "gzip", "Content-Length": str(len(body))}
        sock.sendall(http_answer("200 OK", headers, body))
    elif mode == "agent-dribble":
        sock.sendall(http_answer("200 OK", {**json_type, "Content-Length": "1000000"}))
        while True:
            sock.sendall(b" ")
            time.sleep(seconds)
    elif mode == "agent-list":
        sock.sendall(http_answer("200 OK", {**json_type, "Content-Length": "6"}, b"[1, 2]"))
    elif mode == "agent-deep":
        body = b"[" * 100_000 + b"]" * 100_000
        sock.sendall(http_answer("200 OK", {**json_type, "Content-Length": str(len(body))}, body))


class Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self, mode: str, host: str, port: int, seconds: float, transport: str = "tcp"
    ) -> None:
        self.mode, self.seconds, self.transport = mode, seconds, transport
        super().__init__((host, port), Handler)


class Handler(socketserver.BaseRequestHandler):
    server: Server

    def handle(self) -> None:
        mode, seconds = self.server.mode, self.server.seconds
        with suppress(Gone, OSError):
            if mode.startswith("vnc-"):
                vnc(mode, self.request, seconds, self.server.transport)
            else:
                agent(mode, self.request, seconds)


@contextmanager
def running(mode: str, seconds: float = 2.0, transport: str = "tcp") -> Iterator[int]:
    """The hostile server on loopback, in a thread; yields its port."""
    server = Server(mode, "127.0.0.1", 0, seconds, transport)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


if __name__ == "__main__":
    mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    seconds = float(sys.argv[4]) if len(sys.argv) > 4 else 2.0
    Server(mode, host, port, seconds, sys.argv[5] if len(sys.argv) > 5 else "tcp").serve_forever()
