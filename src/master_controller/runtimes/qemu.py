"""The QEMU runtime: a microVM per guest, booted from the image's kernel, initrd and disk.

Per guest: a qcow2 overlay backed by the image's ext4 (megabytes, never a copy), a small
ext4 config drive labelled MCCONFIG carrying guest.json, and a network namespace in which
the VM's tap device is bridged with the veth to the host. QEMU runs in that namespace, in a
session of its own, with its QMP socket in the guest's folder.

QEMU is not trusted with the host: it runs as the guest's own unprivileged UID
(:mod:`.vmm_user`), with no capabilities and no_new_privs, under its seccomp sandbox
(``-sandbox on`` denying obsolete calls, set*id, fork/exec and resource control), and it
opens no host path of the guest's: :mod:`.vmm_exec` opens the disks, config drive, kernel,
console log, QMP socket and tap as root and hands them over as descriptors. The guest's
folder stays 0700 root with every file 0600.

Hibernate pauses the VM and migrates its memory and device state to a file next to the disk
overlay (QMP, through a descriptor we open 0600), then stops QEMU; resume starts QEMU with
``-incoming fd:N`` reading that file (``exec:`` would need the fork the sandbox denies).

Acceleration: KVM where a probe boot has shown it works (:mod:`.kvm`), TCG otherwise. The
choice is recorded per guest, so a hibernated guest resumes with the accelerator it was
saved under.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

from master_controller.commands import run
from master_controller.errors import (
    CommandError,
    GuestError,
    GuestStartFailed,
    GuestStateError,
    MCError,
)
from master_controller.images.store import ImageInfo
from master_controller.process import ProcessRef, spawn
from master_controller.runtimes.base import (
    GuestState,
    GuestStatus,
    ProbeResult,
)
from master_controller.runtimes.config_drive import make_config_drive
from master_controller.runtimes.hosted import HostedRuntime, discard_failed_save
from master_controller.runtimes.kvm import QEMU, SANDBOX, kvm_groups, kvm_probe
from master_controller.runtimes.qmp import Qmp
from master_controller.runtimes.vmm_exec import VmmLaunch
from master_controller.runtimes.vmm_user import make_private, vmm_uid
from master_controller.settings import Settings
from master_controller.steps import StepLog
from mc_agent.config import GuestConfig

TAP = "tap0"
STATE_FILE = "memory.state"


class QemuRuntime(HostedRuntime):
    guest_configures_network = True

    name = "qemu"

    @classmethod
    def probe(cls, settings: Settings) -> ProbeResult:
        missing = [t for t in (QEMU, "qemu-img", "mkfs.ext4", "nft") if shutil.which(t) is None]
        if missing:
            return ProbeResult(False, f"not installed: {', '.join(missing)} (qemu-system-x86)")
        kvm = kvm_probe(settings)
        if kvm.usable:
            return ProbeResult(True, f"QEMU with KVM ({kvm.reason} in {kvm.seconds}s)")
        return ProbeResult(
            True,
            f"QEMU with TCG, software emulation: KVM is not usable ({kvm.reason})",
            fallback_only=True,
        )

    def prepare(
        self, folder: Path, image: ImageInfo, config: GuestConfig, steps: StepLog
    ) -> dict[str, Any]:
        make_private(folder)
        with steps.step("disk layer"):
            _make_overlay(image.disk, folder / "disk.qcow2")
        with steps.step("config drive"):
            make_config_drive(config, folder / "config.img")
        return {
            "kernel": str(image.path / "vmlinuz"),
            "initrd": str(image.path / "initrd.img"),
            "backing": str(image.disk),
            "accel": "kvm" if kvm_probe(self.settings).usable else "tcg",
        }

    async def start(self, guest: GuestState, steps: StepLog | None = None) -> None:
        self.check_startable(guest)
        await self._launch(guest, steps or StepLog(), incoming=None)

    async def _launch(self, guest: GuestState, steps: StepLog, incoming: Path | None) -> None:
        """Network, then QEMU: a fresh boot, or (``incoming``) a restore of saved state."""
        folder = self.guest_dir(guest.guest_id)
        step = "network"
        try:
            async with AsyncExitStack() as undo:
                with steps.step(step):
                    link = await self.network_up(guest, undo, tap=TAP, reuse=incoming is not None)
                step = "boot" if incoming is None else "restore"
                with steps.step(step):
                    make_private(folder)
                    # the plain guest.json an older version left beside its config drive
                    shutil.rmtree(folder / "config", ignore_errors=True)
                    launch = self.vmm_launch(guest)
                    argv = self._argv(guest, folder, launch, incoming)
                    log = folder / "qemu.log"
                    os.close(os.open(log, os.O_WRONLY | os.O_CREAT, 0o600))
                    process = spawn(["ip", "netns", "exec", link.namespace, *argv], log)
                    undo.callback(process.signal, signal.SIGKILL)
                    if await process.wait(0.5):
                        tail = log.read_text(errors="replace")[-500:]
                        raise GuestStartFailed(step, f"QEMU exited at once: {tail}")
                    guest.resources["process"] = process.model_dump()
                    if incoming is not None:
                        await self._continue_after_restore(folder)
                guest.status = GuestStatus.RUNNING
                guest.reason = ""
                self.save(guest)
                undo.pop_all()
        except (MCError, OSError) as exc:
            raise self.start_failed(guest, step, exc) from exc

    def vmm_launch(self, guest: GuestState) -> VmmLaunch:
        """Who the guest's QEMU runs as: its own UID and GID, no groups but /dev/kvm's."""
        uid = vmm_uid(int(guest.resources["lease"]))
        kvm = guest.resources.get("accel") == "kvm"
        return VmmLaunch(uid=uid, gid=uid, groups=(kvm_groups() or []) if kvm else [])

    def _argv(
        self, guest: GuestState, folder: Path, launch: VmmLaunch, incoming: Path | None
    ) -> list[str]:
        """QEMU's command line through ``launch``: every host file is a descriptor that
        ``launch`` opens (``/dev/fdset/N`` for block and chardev files, whose access mode
        QEMU checks; ``/proc/self/fd/N`` for the kernel and initrd, which it reads by name)."""
        accel = guest.resources.get("accel", "tcg")
        merge = "on" if self.settings.guest_memory_merging else "off"
        for boot_file in (guest.resources["kernel"], guest.resources["initrd"]):
            if not os.stat(boot_file).st_mode & 0o004:
                raise GuestStartFailed(
                    "boot", f"{boot_file} must be readable by all (QEMU reopens it unprivileged)"
                )
        console = launch.fd("append" if incoming else "new", folder / "console.log")
        disk = launch.fd("rdwr", folder / "disk.qcow2")
        backing = launch.fd("read", guest.resources.get("backing") or _backing_of(guest))
        config = launch.fd("read", folder / "config.img")
        qmp = launch.fd("listen", folder / "qmp.sock")
        argv = [
            shutil.which(QEMU) or QEMU,
            "-name", f"mc-{guest.guest_id[:40]}",
            "-sandbox", SANDBOX,
            # explicit either way: QEMU's default (on) left it to the host's ksmd
            "-machine", f"q35,accel={accel},mem-merge={merge}",
            "-cpu", "host" if accel == "kvm" else "max",
            "-smp", str(self.settings.vm_cpus),
            "-m", str(self.settings.vm_memory_mib),
            "-nodefaults", "-no-user-config", "-display", "none",
            "-add-fd", f"fd={console},set=1",
            "-chardev", "file,id=console,path=/dev/fdset/1,append=on",
            "-serial", "chardev:console",
            "-kernel", f"/proc/self/fd/{launch.fd('read', guest.resources['kernel'])}",
            "-initrd", f"/proc/self/fd/{launch.fd('read', guest.resources['initrd'])}",
            "-append", "root=/dev/vda rw console=ttyS0 quiet",
            "-add-fd", f"fd={disk},set=2",
            "-add-fd", f"fd={backing},set=3",
            "-add-fd", f"fd={config},set=4",
            # the overlay's backing file is named here, so QEMU never opens the image by path
            "-blockdev", "driver=file,node-name=base-file,filename=/dev/fdset/3,read-only=on",
            "-blockdev", "driver=raw,node-name=base,file=base-file,read-only=on",
            "-blockdev", "driver=file,node-name=disk-file,filename=/dev/fdset/2",
            "-blockdev", "driver=qcow2,node-name=disk,file=disk-file,backing=base",
            "-device", "virtio-blk-pci,drive=disk",
            "-blockdev", "driver=file,node-name=config-file,filename=/dev/fdset/4,read-only=on",
            "-blockdev", "driver=raw,node-name=config,file=config-file,read-only=on",
            "-device", "virtio-blk-pci,drive=config",
            "-netdev", f"tap,id=net0,fd={launch.fd('tap', TAP)}",
            "-device", "virtio-net-pci,netdev=net0",
            "-chardev", f"socket,id=qmp,fd={qmp},server=on,wait=off",
            "-mon", "chardev=qmp,mode=control",
        ]  # fmt: skip
        if incoming is not None:
            argv += ["-incoming", f"fd:{launch.fd('read', incoming)}"]
        return launch.argv(argv)

    async def hibernate(self, guest: GuestState) -> None:
        """Pause, save memory and device state next to the disk overlay, stop QEMU. The
        guest's network (and so its address and link) stays for the resume."""
        if self.status(guest) != GuestStatus.RUNNING:
            raise GuestStateError(f"guest {guest.guest_id} is {guest.status}, not running")
        folder = self.guest_dir(guest.guest_id)
        state = folder / STATE_FILE
        started = time.monotonic()
        async with Qmp(folder / "qmp.sock") as qmp:
            await qmp.command("stop")
            try:
                await self._save_state(qmp, state)
            except GuestError as exc:
                failed = discard_failed_save(folder, exc, [STATE_FILE])
                await qmp.command("cont")
                raise failed from exc
            await qmp.command("quit")
        process = ProcessRef.model_validate(guest.resources.pop("process"))
        if not await process.wait(10):
            process.signal(signal.SIGKILL)
            await process.wait(5)
        guest.resources["snapshot"] = {
            "file": str(state),
            "bytes": state.stat().st_size,
            "seconds": round(time.monotonic() - started, 2),
        }
        guest.status = GuestStatus.HIBERNATED
        self.save(guest)

    @staticmethod
    async def _save_state(qmp: Qmp, state: Path) -> None:
        """Migrate the paused VM's memory and device state into ``state``. QEMU writes to a
        descriptor we open (``fd:``), so a write error comes back as QEMU saw it (for
        example "No space left on device")."""
        await qmp.command("migrate-set-parameters", **{"max-bandwidth": 8 * 2**30})
        fd = os.open(state, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            await qmp.send_fd(fd, "snapshot")
        finally:
            os.close(fd)
        await qmp.command("migrate", uri="fd:snapshot")
        report = await qmp.wait_migration(timeout=300)
        if report.get("status") != "completed":
            raise GuestError(f"saving the guest failed: {report.get('error-desc', report)}")

    async def resume(self, guest: GuestState, steps: StepLog | None = None) -> None:
        """Start QEMU from the saved state (``-incoming``) and let the guest run on."""
        if guest.status != GuestStatus.HIBERNATED:
            raise GuestStateError(f"guest {guest.guest_id} is {guest.status}, not hibernated")
        state = Path(guest.resources["snapshot"]["file"])
        await self._launch(guest, steps or StepLog(), incoming=state)
        with contextlib.suppress(FileNotFoundError):
            await asyncio.to_thread(os.remove, state)  # as big as the guest's memory
        guest.resources.pop("snapshot", None)
        self.save(guest)

    async def _continue_after_restore(self, folder: Path) -> None:
        async with Qmp(folder / "qmp.sock", timeout=60) as qmp:
            deadline = time.monotonic() + 300
            while (status := await qmp.status()) in ("inmigrate", "restore-vm"):
                if time.monotonic() > deadline:
                    raise GuestError("restoring the guest's memory took over 300s")
                await asyncio.sleep(0.05)
            if status != "running":
                await qmp.command("cont")

    async def _shutdown(self, guest: GuestState, graceful: bool = False) -> None:
        """Stop the VMM (its disk overlay stays), then remove the guest's network. QEMU
        quits in order on SIGTERM, so ``graceful`` changes nothing here."""
        guest.resources.pop("snapshot", None)
        data = guest.resources.pop("process", None)
        if data:
            process = ProcessRef.model_validate(data)
            if process.signal(signal.SIGTERM) and not await process.wait(5):
                process.signal(signal.SIGKILL)
                await process.wait(5)
        await self.network_down(guest)


def _make_overlay(backing: Path, overlay: Path) -> None:
    try:
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", backing, "-F", "raw", overlay])
    except CommandError as exc:
        raise GuestStartFailed("disk layer", exc.reason) from exc
    overlay.chmod(0o600)


def _backing_of(guest: GuestState) -> str:
    """The image disk under a guest created before ``backing`` was recorded: the one its
    kernel came with."""
    return str(Path(guest.resources["kernel"]).with_name("disk.ext4"))
