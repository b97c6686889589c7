"""The uncompressed kernel (``vmlinux``) inside a bzImage, for VMMs that boot ELF kernels
only (Firecracker).

A bzImage's header says where its compressed payload lies (``payload_offset`` and
``payload_length`` in the x86 boot protocol, version 2.08 and later); the payload's magic
says how it is compressed. Debian's cloud kernels use the legacy LZ4 frame format, others
gzip, xz or zstd. The result must be an ELF file, or nothing is written.
"""

from __future__ import annotations

import lzma
import os
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import lz4.block
import zstandard

from master_controller.errors import BuildError

ELF_MAGIC = b"\x7fELF"
LZ4_LEGACY_MAGIC = b"\x02\x21\x4c\x18"
LZ4_LEGACY_BLOCK = 8 << 20
MIN_BOOT_PROTOCOL = 0x208  # the first version with payload_offset/payload_length


def _lz4_legacy(payload: bytes) -> bytes:
    """Blocks of at most 8 MiB, each after its little-endian compressed size; further magics
    may start new streams, and the kernel's build appends the uncompressed size."""
    out = bytearray()
    pos = 4
    while pos + 4 <= len(payload):
        if payload[pos : pos + 4] == LZ4_LEGACY_MAGIC:
            pos += 4
            continue
        (size,) = struct.unpack_from("<I", payload, pos)
        if pos + 4 + size > len(payload):
            if len(payload) - pos == 4 and size == len(out):
                break  # the trailing size word
            raise EOFError("the LZ4 stream is truncated")
        out += lz4.block.decompress(
            payload[pos + 4 : pos + 4 + size], uncompressed_size=LZ4_LEGACY_BLOCK
        )
        pos += 4 + size
    return bytes(out)


def _zstd(payload: bytes) -> bytes:
    stream = zstandard.ZstdDecompressor().decompressobj()
    out = stream.decompress(payload)
    if not stream.eof:
        raise EOFError("the zstd stream is truncated")
    return out


def _gzip(payload: bytes) -> bytes:
    # a size word follows the gzip stream; the decompressor leaves it in unused_data
    stream = zlib.decompressobj(wbits=31)
    out = stream.decompress(payload)
    if not stream.eof:
        raise EOFError("the gzip stream is truncated")
    return out


def _xz(payload: bytes) -> bytes:
    stream = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
    out = stream.decompress(payload)
    if not stream.eof:
        raise EOFError("the xz stream is truncated")
    return out


DECOMPRESSION_ERRORS = (
    zlib.error,
    EOFError,
    lzma.LZMAError,
    lz4.block.LZ4BlockError,
    zstandard.ZstdError,
)

DECOMPRESSORS: dict[bytes, tuple[str, Callable[[bytes], bytes]]] = {
    LZ4_LEGACY_MAGIC: ("lz4", _lz4_legacy),
    b"\x28\xb5\x2f\xfd": ("zstd", _zstd),
    b"\x1f\x8b": ("gzip", _gzip),
    b"\xfd7zXZ\x00": ("xz", _xz),
}


def payload(bzimage: bytes) -> tuple[str, bytes]:
    """The compression name and the compressed payload of a bzImage."""
    if len(bzimage) < 0x250 or bzimage[0x202:0x206] != b"HdrS":
        raise BuildError("not a bzImage (no HdrS boot header)")
    (version,) = struct.unpack_from("<H", bzimage, 0x206)
    if version < MIN_BOOT_PROTOCOL:
        raise BuildError(f"boot protocol {version:#x} is too old to locate the kernel payload")
    setup_sectors = bzimage[0x1F1] or 4
    offset, length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sectors + 1) * 512 + offset
    data = bzimage[start : start + length]
    for magic, (name, _) in DECOMPRESSORS.items():
        if data.startswith(magic):
            return name, data
    raise BuildError(f"unknown kernel compression (payload starts {data[:6].hex()})")


def extract_vmlinux(bzimage: Path, dest: Path) -> str:
    """Write the ELF kernel inside ``bzimage`` to ``dest``; returns the compression used."""
    name, data = payload(bzimage.read_bytes())
    decompress = next(fn for n, fn in DECOMPRESSORS.values() if n == name)
    try:
        elf = decompress(data)
    except DECOMPRESSION_ERRORS as exc:
        raise BuildError(f"the kernel's {name} payload does not decompress: {exc}") from exc
    if not elf.startswith(ELF_MAGIC):
        raise BuildError(f"the kernel's {name} payload is not an ELF file")
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.write_bytes(elf)
    os.replace(tmp, dest)
    return name
