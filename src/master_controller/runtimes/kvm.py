"""Whether KVM really works here, proven by booting a guest kernel, not by opening /dev/kvm.

On nested hosts /dev/kvm can open fine while a stock guest kernel crawls and then dies with
an emulation failure (or QEMU cannot even set the vCPU's MSRs). So the probe boots the
current image's kernel and initrd under KVM to the initrd's first userspace command, which
prints a marker and exits; it passes only if the marker appears within the time limit.

The probe boots QEMU exactly as guests run it: as an unprivileged UID with no groups but
/dev/kvm's (:func:`kvm_groups`), under QEMU's seccomp sandbox, with its files handed over as
descriptors (:mod:`.vmm_exec`). A /dev/kvm that only root can open is not usable.

A probe boot takes a few seconds, so its result is kept in ``<data_dir>/kvm-probe.json``
keyed by what decides it: the host kernel, the QEMU version, the guest kernel's digest and
who may open /dev/kvm.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from master_controller.digests import file_digest
from master_controller.errors import ImageNotFound
from master_controller.images.store import ImageStore
from master_controller.runtimes.vmm_exec import VmmLaunch
from master_controller.runtimes.vmm_user import PROBE_UID
from master_controller.settings import Settings

QEMU = "qemu-system-x86_64"
MARKER = "MC-PROBE-OK"
PROBE_TIMEOUT = 20.0
CACHE_NAME = "kvm-probe.json"
DEV_KVM = Path("/dev/kvm")
# QEMU's seccomp filter: no obsolete system calls, no set*uid/set*gid, no fork/exec, no
# scheduler or NUMA changes (libvirt's choice as well)
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"


@dataclass(frozen=True)
class KvmProbe:
    usable: bool
    reason: str
    seconds: float = 0.0


def kvm_groups(device: Path = DEV_KVM) -> list[int] | None:
    """The supplementary groups an unprivileged VMM needs to open ``device`` (/dev/kvm):
    none if everyone may, its group if that group may; None if only its owner may (or it
    is missing)."""
    try:
        mode = device.stat()
    except OSError:
        return None
    if mode.st_mode & (stat.S_IROTH | stat.S_IWOTH) == stat.S_IROTH | stat.S_IWOTH:
        return []
    if mode.st_mode & (stat.S_IRGRP | stat.S_IWGRP) == stat.S_IRGRP | stat.S_IWGRP:
        return [mode.st_gid]
    return None


def _dev_kvm() -> str:
    try:
        mode = DEV_KVM.stat()
    except OSError:
        return "missing"
    return f"{stat.S_IMODE(mode.st_mode):04o} {mode.st_uid}:{mode.st_gid}"


def probe_boot(kernel: Path, initrd: Path, accel: str, timeout: float = PROBE_TIMEOUT) -> KvmProbe:
    """Boot ``kernel`` + ``initrd`` with ``accel`` (kvm or tcg) until the initrd's shell
    prints the marker, run as guests are (unprivileged, sandboxed, files as descriptors).
    Usable iff it does within ``timeout``."""
    cpu = "host" if accel == "kvm" else "max"
    launch = VmmLaunch(uid=PROBE_UID, gid=PROBE_UID, groups=kvm_groups() or [])
    with tempfile.TemporaryDirectory(prefix="mc-probe-") as tmp:
        console = Path(tmp) / "console.log"
        argv = [
            shutil.which(QEMU) or QEMU,
            "-sandbox", SANDBOX,
            "-machine", f"q35,accel={accel}",
            "-cpu", cpu,
            "-m", "256",
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-add-fd", f"fd={launch.fd('new', console)},set=1",
            "-chardev", "file,id=console,path=/dev/fdset/1,append=on",
            "-serial", "chardev:console",
            "-kernel", f"/proc/self/fd/{launch.fd('read', kernel)}",
            "-initrd", f"/proc/self/fd/{launch.fd('read', initrd)}",
            "-append", f'console=ttyS0 panic=-1 quiet rdinit=/bin/sh -- -c "echo {MARKER}"',
        ]  # fmt: skip
        started = time.monotonic()
        try:
            done = subprocess.run(
                launch.argv(argv), capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            return KvmProbe(False, f"a probe boot with {accel} did not finish in {timeout:.0f}s")
        seconds = round(time.monotonic() - started, 2)
        output = console.read_text(errors="replace") if console.exists() else ""
        if MARKER in output:
            return KvmProbe(True, f"a probe boot with {accel} reached userspace", seconds)
        errors = (done.stderr.strip().splitlines() or ["no error output"])[0]
        return KvmProbe(False, f"a probe boot with {accel} failed ({errors})", seconds)


def kvm_probe(settings: Settings) -> KvmProbe:
    """Whether guests can use KVM on this host (cached per host kernel, QEMU, guest kernel
    and who may open /dev/kvm)."""
    if not DEV_KVM.exists():
        return KvmProbe(False, "/dev/kvm is missing")
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
        "dev_kvm": _dev_kvm(),
        "unprivileged": True,
    }
    cache = settings.data_dir / CACHE_NAME
    try:
        saved = json.loads(cache.read_text())
        if saved.get("key") == key:
            return KvmProbe(**saved["result"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    if kvm_groups() is None:
        result = KvmProbe(
            False,
            f"/dev/kvm ({_dev_kvm()}) may be opened by its owner only; guests' VMMs run "
            "unprivileged, so give it a group that may (Debian's udev rule: 0660 root:kvm)",
        )
    else:
        result = probe_boot(kernel, initrd, "kvm")
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    # per thread too: probes run in worker threads, and may run two at once
    tmp = cache.with_name(f".{CACHE_NAME}.{os.getpid()}.{threading.get_ident()}")
    tmp.write_text(json.dumps({"key": key, "result": asdict(result)}, indent=2))
    tmp.replace(cache)
    return result


def _qemu_version() -> str:
    done = subprocess.run([QEMU, "--version"], capture_output=True, text=True, check=False)
    return done.stdout.splitlines()[0] if done.stdout else "unknown"
