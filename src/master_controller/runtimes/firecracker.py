"""The Firecracker runtime: a Firecracker microVM per guest, driven over its HTTP API.

Per guest: a copy-on-write copy of the image's raw ext4 disk (a reflink where the file
system can, otherwise a sparse copy: Firecracker has no backing-file format), the same
MCCONFIG config drive as QEMU guests, and a network namespace in which Firecracker's tap
is bridged with the veth to the host. The kernel is the image's uncompressed ``vmlinux``.

Firecracker runs through its jailer (:mod:`.jailer`): in a chroot holding only the guest's
kernel, initrd, disk, config drive, API socket and snapshots, as the guest's own
unprivileged UID (:mod:`.vmm_user`), in the guest's network namespace, under Firecracker's
own seccomp filters. The tap is owned by that UID so the jailed process may attach to it.

Hibernate pauses the VM (``PATCH /vm``), writes a full snapshot (``PUT /snapshot/create``:
device state plus a memory file) next to the disk and stops Firecracker; resume starts a
new Firecracker process in the same namespace (the tap has the same name) and loads the
snapshot with ``resume_vm``.

Usable only where the ``firecracker`` binary is found and a probe boot shows KVM works.
Guests need a kernel that finds Firecracker's virtio-mmio devices: through ACPI (Firecracker
1.8 and later describe them in the DSDT) or ``CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES``.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import signal
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

from master_controller.commands import in_thread, run
from master_controller.errors import (
    CommandError,
    GuestError,
    GuestStartFailed,
    GuestStateError,
    MCError,
)
from master_controller.images.store import ImageInfo
from master_controller.process import ProcessRef, spawn
from master_controller.runtimes.base import GuestState, GuestStatus, ProbeResult
from master_controller.runtimes.config_drive import make_config_drive
from master_controller.runtimes.firecracker_api import (
    BootSource,
    Drive,
    FirecrackerApi,
    InstanceStart,
    MachineConfig,
    MemBackend,
    NetworkInterface,
    SnapshotCreate,
    SnapshotLoad,
    VmState,
)
from master_controller.runtimes.hosted import HostedRuntime, discard_failed_save
from master_controller.runtimes.jailer import API_SOCKET, INITRD, KERNEL, Jail, jailer_for
from master_controller.runtimes.kvm import kvm_probe
from master_controller.runtimes.vmm_user import make_private, vmm_uid
from master_controller.settings import Settings
from master_controller.steps import StepLog
from mc_agent.config import GuestConfig

TAP = "tap0"
BOOT_ARGS = "console=ttyS0 reboot=k panic=1 root=/dev/vda rw quiet"
SNAPSHOT_FILE = "vm.snapshot"
MEMORY_FILE = "vm.memory"
DISK = "disk.ext4"
CONFIG_DRIVE = "config.img"


def guest_mac(guest_id: str) -> str:
    """A stable, locally administered unicast MAC for the guest's NIC."""
    digest = hashlib.sha256(guest_id.encode()).digest()
    return ":".join(f"{b:02x}" for b in (0x06, 0x00, *digest[:4]))


class FirecrackerRuntime(HostedRuntime):
    guest_configures_network = True

    name = "firecracker"

    @classmethod
    def probe(cls, settings: Settings) -> ProbeResult:
        binary = shutil.which(settings.firecracker_binary)
        if binary is None:
            return ProbeResult(False, f"the {settings.firecracker_binary!r} binary is not on PATH")
        if jailer_for(settings.firecracker_binary) is None:
            return ProbeResult(
                False, f"{binary} is installed but its jailer is not (beside it or on PATH)"
            )
        if shutil.which("nft") is None or shutil.which("mkfs.ext4") is None:
            return ProbeResult(False, "nft and mkfs.ext4 are needed (nftables, e2fsprogs)")
        kvm = kvm_probe(settings)
        if not kvm.usable:
            return ProbeResult(False, f"{binary} is installed but KVM is not usable: {kvm.reason}")
        return ProbeResult(True, f"{binary} with KVM ({kvm.reason})")

    def prepare(
        self, folder: Path, image: ImageInfo, config: GuestConfig, steps: StepLog
    ) -> dict[str, Any]:
        kernel = image.path / "vmlinux"
        if not kernel.is_file():
            raise GuestStartFailed(
                "kernel", f"image {image.id} has no vmlinux; rebuild it with `image build`"
            )
        make_private(folder)
        jail = Jail.of(folder, config.guest_id, self.settings.firecracker_binary)
        jail.make()
        disk = jail.host(DISK)
        with steps.step("disk copy") as rec:
            started = time.monotonic()
            try:
                run(["cp", "--reflink=auto", "--sparse=always", image.disk, disk])
            except CommandError as exc:
                raise GuestStartFailed("disk copy", exc.reason) from exc
            disk.chmod(0o600)
            rec.detail = f"{disk.stat().st_blocks * 512 / 2**20:.0f} MiB"
            copy_seconds = round(time.monotonic() - started, 2)
        with steps.step("config drive"):
            make_config_drive(config, jail.host(CONFIG_DRIVE))
        return {
            "kernel": str(kernel),
            "initrd": str(image.path / "initrd.img"),
            "disk_copy_seconds": copy_seconds,
        }

    async def start(self, guest: GuestState, steps: StepLog | None = None) -> None:
        self.check_startable(guest)
        await self._launch(guest, steps or StepLog(), restore=False)

    def jail(self, guest: GuestState) -> Jail:
        return Jail.of(
            self.guest_dir(guest.guest_id), guest.guest_id, self.settings.firecracker_binary
        )

    async def _launch(self, guest: GuestState, steps: StepLog, restore: bool) -> None:
        folder = self.guest_dir(guest.guest_id)
        jail = self.jail(guest)
        uid = vmm_uid(int(guest.resources["lease"]))
        step = "network"
        try:
            async with AsyncExitStack() as undo:
                with steps.step(step):
                    link = await self.network_up(guest, undo, tap=TAP, reuse=restore, tap_owner=uid)
                step = "restore" if restore else "boot"
                with steps.step(step):
                    jailer = jailer_for(self.settings.firecracker_binary)
                    if jailer is None:
                        raise GuestStartFailed(step, "Firecracker's jailer is not installed")
                    saved = [SNAPSHOT_FILE, MEMORY_FILE] if restore else []
                    # file work (the kernel may be copied in): in a worker thread
                    await in_thread(self._furnish, guest, folder, jail, uid, saved)
                    log = folder / "console.log"
                    if not restore:
                        log.unlink(missing_ok=True)
                    os.close(os.open(log, os.O_WRONLY | os.O_CREAT, 0o600))
                    process = spawn(jail.argv(jailer, uid, link.namespace_path), log)
                    undo.callback(process.signal, signal.SIGKILL)
                    async with FirecrackerApi(jail.host(API_SOCKET)) as api:
                        if restore:
                            await self._load_snapshot(api)
                        else:
                            await self._configure_and_boot(api, guest)
                    guest.resources["process"] = process.model_dump()
                guest.status = GuestStatus.RUNNING
                guest.reason = ""
                self.save(guest)
                undo.pop_all()
        except (MCError, OSError) as exc:
            raise self.start_failed(guest, step, exc) from exc

    @staticmethod
    def _furnish(guest: GuestState, folder: Path, jail: Jail, uid: int, saved: list[str]) -> None:
        """The jail, made afresh, with the kernel, initrd and the guest's files in it."""
        make_private(folder)
        jail.make()
        jail.furnish(Path(guest.resources["kernel"]), Path(guest.resources["initrd"]))
        jail.reset()
        jail.hand_over(uid, [DISK, CONFIG_DRIVE, *saved])

    async def _configure_and_boot(self, api: FirecrackerApi, guest: GuestState) -> None:
        """Configure and boot; every path is one inside the jail."""
        settings = self.settings
        await api.put(
            "machine-config",
            MachineConfig(vcpu_count=settings.vm_cpus, mem_size_mib=settings.vm_memory_mib),
        )
        await api.put(
            "boot-source",
            BootSource(
                kernel_image_path=Jail.inside(KERNEL),
                initrd_path=Jail.inside(INITRD),
                boot_args=BOOT_ARGS,
            ),
        )
        for drive in (
            Drive(
                drive_id="rootfs",
                path_on_host=Jail.inside(DISK),
                is_root_device=True,
                is_read_only=False,
            ),
            Drive(
                drive_id="config",
                path_on_host=Jail.inside(CONFIG_DRIVE),
                is_root_device=False,
                is_read_only=True,
            ),
        ):
            await api.put(f"drives/{drive.drive_id}", drive)
        await api.put(
            "network-interfaces/eth0",
            NetworkInterface(
                iface_id="eth0", host_dev_name=TAP, guest_mac=guest_mac(guest.guest_id)
            ),
        )
        await api.put("actions", InstanceStart())

    async def _load_snapshot(self, api: FirecrackerApi) -> None:
        await api.put(
            "snapshot/load",
            SnapshotLoad(
                snapshot_path=Jail.inside(SNAPSHOT_FILE),
                mem_backend=MemBackend(backend_path=Jail.inside(MEMORY_FILE)),
                resume_vm=True,
            ),
        )
        state = (await api.instance()).get("state")
        if state != "Running":
            raise GuestError(f"the restored VM is {state!r}, not Running")

    async def hibernate(self, guest: GuestState) -> None:
        """Pause, write a full snapshot next to the disk, stop Firecracker. The network
        stays, so the restored VM finds its tap under the same name."""
        if self.status(guest) != GuestStatus.RUNNING:
            raise GuestStateError(f"guest {guest.guest_id} is {guest.status}, not running")
        jail = self.jail(guest)
        started = time.monotonic()
        async with FirecrackerApi(jail.host(API_SOCKET), timeout=300) as api:
            await api.patch("vm", VmState(state="Paused"))
            try:
                await api.put(
                    "snapshot/create",
                    SnapshotCreate(
                        snapshot_path=Jail.inside(SNAPSHOT_FILE),
                        mem_file_path=Jail.inside(MEMORY_FILE),
                    ),
                )
            except GuestError as exc:
                failed = discard_failed_save(jail.root, exc, [SNAPSHOT_FILE, MEMORY_FILE])
                await api.patch("vm", VmState(state="Resumed"))
                raise failed from exc
        process = ProcessRef.model_validate(guest.resources.pop("process"))
        process.signal(signal.SIGKILL)
        await process.wait(5)
        for name in (SNAPSHOT_FILE, MEMORY_FILE):
            jail.host(name).chmod(0o600)
        guest.resources["snapshot"] = {
            "file": str(jail.host(SNAPSHOT_FILE)),
            "bytes": sum(jail.host(f).stat().st_size for f in (SNAPSHOT_FILE, MEMORY_FILE)),
            "seconds": round(time.monotonic() - started, 2),
        }
        guest.status = GuestStatus.HIBERNATED
        self.save(guest)

    async def resume(self, guest: GuestState, steps: StepLog | None = None) -> None:
        if guest.status != GuestStatus.HIBERNATED:
            raise GuestStateError(f"guest {guest.guest_id} is {guest.status}, not hibernated")
        await self._launch(guest, steps or StepLog(), restore=True)
        jail = self.jail(guest)
        for name in (SNAPSHOT_FILE, MEMORY_FILE):  # the memory file is as big as the guest's
            await asyncio.to_thread(jail.host(name).unlink, missing_ok=True)
        guest.resources.pop("snapshot", None)
        self.save(guest)

    async def _shutdown(self, guest: GuestState, graceful: bool = False) -> None:
        """Stop the VMM (its disk stays), then remove the guest's network. A hibernated
        guest is saved already, so ``graceful`` changes nothing here."""
        guest.resources.pop("snapshot", None)
        data = guest.resources.pop("process", None)
        if data:
            process = ProcessRef.model_validate(data)
            if process.signal(signal.SIGKILL):
                await process.wait(5)
        await self.network_down(guest)
