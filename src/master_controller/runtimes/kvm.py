"""Whether KVM really works here, proven by booting a guest kernel, not by opening /dev/kvm.

On nested hosts /dev/kvm can open fine while a stock guest kernel crawls and then dies with
an emulation failure (or QEMU cannot even set the vCPU's MSRs). So the probe boots the
current image's kernel and initrd under KVM to the initrd's first userspace command, which
prints a marker and exits; it passes only if the marker appears within the time limit.

A probe boot takes a few seconds, so its result is kept in ``<data_dir>/kvm-probe.json``
keyed by what decides it: the host kernel, the QEMU version and the guest kernel's digest.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from master_controller.digests import file_digest
from master_controller.errors import ImageNotFound
from master_controller.images.store import ImageStore
from master_controller.settings import Settings

QEMU = "qemu-system-x86_64"
MARKER = "MC-PROBE-OK"
PROBE_TIMEOUT = 20.0
CACHE_NAME = "kvm-probe.json"


@dataclass(frozen=True)
class KvmProbe:
    usable: bool
    reason: str
    seconds: float = 0.0


def probe_boot(kernel: Path, initrd: Path, accel: str, timeout: float = PROBE_TIMEOUT) -> KvmProbe:
    """Boot ``kernel`` + ``initrd`` with ``accel`` (kvm or tcg) until the initrd's shell
    prints the marker. Usable iff it does within ``timeout``."""
    cpu = "host" if accel == "kvm" else "max"
    with tempfile.TemporaryDirectory(prefix="mc-probe-") as tmp:
        console = Path(tmp) / "console.log"
        argv = [
            QEMU,
            "-machine", f"q35,accel={accel}",
            "-cpu", cpu,
            "-m", "256",
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-serial", f"file:{console}",
            "-kernel", str(kernel),
            "-initrd", str(initrd),
            "-append", f'console=ttyS0 panic=-1 quiet rdinit=/bin/sh -- -c "echo {MARKER}"',
        ]  # fmt: skip
        started = time.monotonic()
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return KvmProbe(False, f"a probe boot with {accel} did not finish in {timeout:.0f}s")
        seconds = round(time.monotonic() - started, 2)
        output = console.read_text(errors="replace") if console.exists() else ""
        if MARKER in output:
            return KvmProbe(True, f"a probe boot with {accel} reached userspace", seconds)
        errors = (done.stderr.strip().splitlines() or ["no error output"])[0]
        return KvmProbe(False, f"a probe boot with {accel} failed ({errors})", seconds)


def kvm_probe(settings: Settings) -> KvmProbe:
    """Whether guests can use KVM on this host (cached per host kernel, QEMU, guest kernel)."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return KvmProbe(False, "/dev/kvm is missing or not accessible")
    if shutil.which(QEMU) is None:
        return KvmProbe(False, f"{QEMU} is not installed, so KVM cannot be probed")
    try:
        image = ImageStore(settings.images_dir).get("current")
    except ImageNotFound:
        return KvmProbe(False, "KVM is unproven: no image is promoted yet to probe-boot with")
    kernel, initrd = image.path / "vmlinuz", image.path / "initrd.img"
    key = {
        "host_kernel": os.uname().release,
        "qemu": _qemu_version(),
        "guest_kernel": image.manifest.get("kernel", {}).get("sha256") or file_digest(kernel),
    }
    cache = settings.data_dir / CACHE_NAME
    try:
        saved = json.loads(cache.read_text())
        if saved.get("key") == key:
            return KvmProbe(**saved["result"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    result = probe_boot(kernel, initrd, "kvm")
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f".{CACHE_NAME}.{os.getpid()}")
    tmp.write_text(json.dumps({"key": key, "result": asdict(result)}, indent=2))
    tmp.replace(cache)
    return result


def _qemu_version() -> str:
    done = subprocess.run([QEMU, "--version"], capture_output=True, text=True, check=False)
    return done.stdout.splitlines()[0] if done.stdout else "unknown"
