"""The uncompressed kernel for Firecracker: found inside a bzImage by its boot header,
decompressed, checked to be ELF, and (with the real golden image) bootable."""

from __future__ import annotations

import gzip
import lzma
import struct
from pathlib import Path

import lz4.block
import pytest
import zstandard

from master_controller.errors import BuildError
from master_controller.images.kernel import LZ4_LEGACY_MAGIC, extract_vmlinux
from master_controller.images.store import ImageStore
from master_controller.runtimes.kvm import probe_boot
from master_controller.settings import Settings

ELF = b"\x7fELF" + bytes(range(256)) * 40000  # ~10 MiB: more than one 8 MiB LZ4 block


def _lz4_legacy(data: bytes) -> bytes:
    out = bytearray(LZ4_LEGACY_MAGIC)
    for i in range(0, len(data), 8 << 20):
        block = lz4.block.compress(data[i : i + (8 << 20)], store_size=False)
        out += struct.pack("<I", len(block)) + block
    return bytes(out) + struct.pack("<I", len(data))  # the size word the kernel build adds


COMPRESSORS = {
    "gzip": lambda d: gzip.compress(d) + struct.pack("<I", len(d)),
    "xz": lambda d: lzma.compress(d, format=lzma.FORMAT_XZ),
    "zstd": lambda d: zstandard.ZstdCompressor().compress(d),
    "lz4": _lz4_legacy,
}


def bzimage(payload: bytes, setup_sectors: int = 3, version: int = 0x20F) -> bytes:
    """A minimal bzImage: the boot header's fields the boot protocol defines, then the
    protected-mode part with the payload at payload_offset."""
    header = bytearray((setup_sectors + 1) * 512)
    header[0x1F1] = setup_sectors
    header[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", header, 0x206, version)
    offset = 0x1234
    struct.pack_into("<II", header, 0x248, offset, len(payload))
    return bytes(header) + bytes(offset) + payload + b"\0" * 64


@pytest.mark.parametrize("compression", sorted(COMPRESSORS))
def test_each_compression_gives_back_the_elf_kernel(compression: str, tmp_path: Path) -> None:
    image = tmp_path / "vmlinuz"
    image.write_bytes(bzimage(COMPRESSORS[compression](ELF)))
    assert extract_vmlinux(image, tmp_path / "vmlinux") == compression
    assert (tmp_path / "vmlinux").read_bytes() == ELF


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"MZ" + bytes(4096), "not a bzImage"),
        (bzimage(gzip.compress(ELF), version=0x206), "too old"),
        (bzimage(b"\x00\x01\x02\x03" * 100), "unknown kernel compression"),
        (bzimage(gzip.compress(b"not an elf kernel")), "not an ELF file"),
        (bzimage(gzip.compress(ELF)[:5000]), "does not decompress|not an ELF file"),
    ],
)
def test_bad_kernels_are_refused_and_write_nothing(
    content: bytes, message: str, tmp_path: Path
) -> None:
    image = tmp_path / "vmlinuz"
    image.write_bytes(content)
    with pytest.raises(BuildError, match=message):
        extract_vmlinux(image, tmp_path / "vmlinux")
    assert list(tmp_path.iterdir()) == [image]


@pytest.mark.integration
@pytest.mark.vm
def test_the_golden_images_vmlinux_boots(golden_image: str, integration_settings: Settings) -> None:
    """The extracted ELF kernel boots (QEMU's PVH entry, as Firecracker uses) to the
    initrd's first userspace command."""
    info = ImageStore(integration_settings.images_dir).get(golden_image)
    vmlinux = info.path / "vmlinux"
    assert vmlinux.read_bytes()[:4] == b"\x7fELF"
    assert info.manifest["vmlinux"]["version"] == info.manifest["kernel"]["version"]
    result = probe_boot(vmlinux, info.path / "initrd.img", "tcg", timeout=60)
    assert result.usable, result.reason
