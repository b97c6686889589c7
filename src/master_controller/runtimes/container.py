"""The container runtime: ``systemd-nspawn --boot`` of the image's rootfs.

Per guest: an overlayfs (the image's rootfs as read-only lower layer, an upper layer on the
guest's own size-limited file system, :mod:`~master_controller.runtimes.disklayer`), a
network namespace with a veth pair (:mod:`master_controller.network`), a cgroup with memory,
pids and CPU limits (:mod:`~master_controller.runtimes.cgroups`), and the per-guest
configuration bind-mounted read-only at ``/mnt/mc-config``.

Hibernating a container keeps its disk layer and address, not its memory: resume boots it
again from the same disk layer.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
from collections.abc import Iterator
from contextlib import AsyncExitStack, contextmanager
from pathlib import Path
from typing import Any

from master_controller.commands import arun, in_thread, run
from master_controller.errors import (
    CommandError,
    GuestStartFailed,
    GuestStateError,
    MCError,
    NetworkError,
)
from master_controller.images.store import ImageInfo
from master_controller.network.netns import GuestLink
from master_controller.process import ProcessRef, spawn
from master_controller.runtimes import cgroups, disklayer, hostlimits, idmap, memmerge
from master_controller.runtimes.base import (
    GuestState,
    GuestStatus,
    ProbeResult,
)
from master_controller.runtimes.disklayer import DiskLayer
from master_controller.runtimes.guestlog import log_reason
from master_controller.runtimes.hosted import HostedRuntime
from master_controller.settings import Settings
from master_controller.steps import StepLog
from mc_agent.config import CONFIG_NAME, MOUNT_POINT, GuestConfig

# seconds nspawn may take to start the guest's init (it was seen to take over 5 s while
# 40 guests started together on 2 cores)
LEADER_TIMEOUT = 60.0


# the host commands a container guest needs (its probe checks them)
REQUIRED_TOOLS = (
    "systemd-nspawn",
    "mount",
    "umount",
    "nft",
    "nsenter",
    "unshare",
    "mkfs.ext4",
    "losetup",
)


class ContainerRuntime(HostedRuntime):
    name = "container"

    @classmethod
    def probe(cls, settings: Settings) -> ProbeResult:
        if missing := [t for t in REQUIRED_TOOLS if shutil.which(t) is None]:
            return ProbeResult(False, f"not installed: {', '.join(missing)} (run scripts/setup.sh)")
        filesystems = Path("/proc/filesystems").read_text()
        if "overlay" not in filesystems or "ext4" not in filesystems:
            return ProbeResult(False, "the kernel has no overlayfs or no ext4")
        if not Path("/dev/loop-control").exists():
            return ProbeResult(False, "no loop devices (/dev/loop-control) for the disk layer")
        if not Path("/proc/self/ns/net").exists() or not Path("/proc/self/ns/user").exists():
            return ProbeResult(False, "the kernel has no network or user namespaces")
        if lacking := cgroups.missing_controllers():
            return ProbeResult(
                False, f"no {', '.join(lacking)} cgroup controller: guests could not be limited"
            )
        return ProbeResult(
            True,
            "systemd-nspawn, overlayfs, loop-mounted ext4, network and user namespaces, "
            "memory/pids/cpu cgroup controllers are available",
        )

    # --- lifecycle ----------------------------------------------------------------------

    def prepare(
        self, folder: Path, image: ImageInfo, config: GuestConfig, steps: StepLog
    ) -> dict[str, Any]:
        for sub in ("rootfs", "config"):
            (folder / sub).mkdir()
        (folder / "config" / CONFIG_NAME).write_text(config.to_json())
        (folder / "config" / CONFIG_NAME).chmod(0o600)
        # the disk layer keeps the size it was made with, whatever the setting says later
        return {"lower": str(image.rootfs), "disk_mib": self.settings.guest_disk_mib}

    async def start(self, guest: GuestState, steps: StepLog | None = None) -> None:
        self.check_startable(guest)
        steps = steps or StepLog()
        folder = self.guest_dir(guest.guest_id)
        step = "network"
        try:
            async with AsyncExitStack() as undo:
                with steps.step(step):
                    link = await self.network_up(guest, undo)
                step = "disk layer"
                with steps.step(step):
                    # mounts and commands in a worker thread; each undo is pushed before its
                    # mount (both are safe to run on what is not mounted): a start cancelled
                    # meanwhile waits for the mount, then undoes it
                    layer = self._disk_layer(guest, folder)
                    undo.push_async_callback(in_thread, disklayer.unmount, folder)
                    await in_thread(layer.mount)
                    undo.push_async_callback(self._unmount_overlay, folder)
                    await in_thread(self._mount_overlay, guest, folder, layer)
                step = "boot"
                with steps.step(step):
                    # every guest's inotify use counts against host root's limits
                    await in_thread(hostlimits.ensure, self.settings.max_sessions)
                    (folder / "console.log").unlink(missing_ok=True)
                    limits = cgroups.Limits.from_settings(self.settings)
                    guest.resources["cgroups"] = cgroups.create(guest.guest_id, limits)
                    undo.push_async_callback(self._remove_cgroups, guest)
                    self.save(guest)  # recorded before anything can run in them
                    argv = cgroups.enter(
                        guest.resources["cgroups"], self._nspawn_argv(guest, folder, link)
                    )
                    if self.settings.guest_memory_merging:
                        argv = memmerge.merging(argv)
                    process = spawn(argv, folder / "console.log")
                    undo.push_async_callback(self._kill, process)
                    leader = await self._wait_for_leader(process, folder / "console.log")
                    guest.resources["process"] = process.model_dump()
                    guest.resources["leader"] = leader.model_dump()
                    guest.resources["pid_namespace"] = _pid_namespace(leader.pid)
                guest.status = GuestStatus.RUNNING
                guest.reason = ""
                self.save(guest)
                undo.pop_all()
        except (MCError, OSError) as exc:
            raise self.start_failed(guest, step, exc) from exc

    async def stop(self, guest: GuestState) -> None:
        """Shut the container down orderly, keeping its disk layer and address (not part
        of the Runtime interface: the controller hibernates or destroys)."""
        await self._shutdown(guest)
        guest.status = GuestStatus.STOPPED
        self.save(guest)

    async def hibernate(self, guest: GuestState) -> None:
        if guest.status != GuestStatus.RUNNING:
            raise GuestStateError(f"guest {guest.guest_id} is {guest.status}, not running")
        await self._shutdown(guest)
        guest.status = GuestStatus.HIBERNATED
        self.save(guest)

    async def resume(self, guest: GuestState, steps: StepLog | None = None) -> None:
        if guest.status != GuestStatus.HIBERNATED:
            raise GuestStateError(f"guest {guest.guest_id} is {guest.status}, not hibernated")
        guest.status = GuestStatus.STOPPED
        await self.start(guest, steps)

    def _nspawn_argv(self, guest: GuestState, folder: Path, link: GuestLink) -> list[str]:
        # nspawn runs inside the guest's network namespace, which the container shares:
        # nspawn 252 cannot join a namespace it does not own once it is in the guest's user
        # namespace (systemd#36363). The guest's root has no say over that network either.
        return [
            "nsenter",
            f"--net={link.namespace_path}",
            "--",
            "systemd-nspawn",
            "--boot",
            f"--directory={folder / 'rootfs'}",
            f"--machine=mc-{guest.guest_id[:12]}",
            "--register=no",
            "--keep-unit",
            # the guest's root is an unprivileged UID range on the host
            f"--private-users={guest.resources['uid_base']}:{idmap.RANGE}",
            "--private-users-ownership=off",
            f"--bind-ro={folder / 'config'}:{MOUNT_POINT}",
            # a pseudo-terminal as the guest's /dev/console, its output into console.log: with
            # a pipe the guest has no /dev/console, and its systemd's own errors (a fatal one
            # included: it then exits, and nspawn with it) were lost
            "--console=read-only",
            "--link-journal=no",
            "--resolv-conf=off",
            "--timezone=off",
            # the guest's init's arguments (its systemd reads them as its kernel command line):
            # on the console, units that fail and what the journal gets at warning or worse,
            # so that console.log says why a guest died; no login prompt on it
            "systemd.show_status=error",
            "systemd.journald.forward_to_console=1",
            "systemd.journald.max_level_console=warning",
            "systemd.getty_auto=0",
        ]

    def _disk_layer(self, guest: GuestState, folder: Path) -> DiskLayer:
        """The guest's writable layer, on its own file system of ``guest_disk_mib``."""
        if (folder / "upper").is_dir():
            # made before disk layers had a size: it could fill the data dir
            raise GuestStartFailed(
                "disk layer", "this guest's disk layer has no size limit; destroy the guest"
            )
        base = idmap.base_for(int(guest.resources["lease"]))
        size = int(guest.resources.get("disk_mib", self.settings.guest_disk_mib))
        return DiskLayer(folder, size, owner=base)

    def _mount_overlay(self, guest: GuestState, folder: Path, layer: DiskLayer) -> None:
        """The guest's root: the image's rootfs, ID-mapped into the guest's UID range, under
        the guest's own upper layer (owned by that range; it keeps what the guest writes)."""
        image_root = Path(guest.resources["lower"])
        for path in (image_root, folder):
            if any(c in str(path) for c in ",:\\"):
                raise GuestStartFailed("disk layer", f"path {path} cannot be used by overlayfs")
        base = idmap.base_for(int(guest.resources["lease"]))
        guest.resources["uid_base"] = base
        for owned in (folder / "config", folder / "config" / CONFIG_NAME):
            os.chown(owned, base, base)
        lower = folder / "lower"
        lower.mkdir(exist_ok=True)
        options = f"lowerdir={lower},upperdir={layer.upper},workdir={layer.work}"
        try:
            # overlayfs holds its own private copy of its layers' mounts: the view goes after
            with image_view(image_root, lower, base):
                run(["mount", "-t", "overlay", "overlay", "-o", options, folder / "rootfs"])
        except (CommandError, OSError) as exc:
            reason = exc.reason if isinstance(exc, CommandError) else str(exc)
            raise GuestStartFailed("disk layer", reason) from exc

    @staticmethod
    async def _unmount_overlay(folder: Path) -> None:
        target = folder / "rootfs"
        if _is_mountpoint(target):
            await arun(["umount", target])

    async def _wait_for_leader(self, process: ProcessRef, console: Path) -> ProcessRef:
        """Find the container's PID 1 (to be able to kill it). nspawn first forks helper
        children that exit again; the leader is the child in a PID namespace of its own
        that has exec'd the guest's init. Waited for while nspawn runs, up to
        :data:`LEADER_TIMEOUT`: on a host busy booting many guests it can take seconds."""
        own = _pid_namespace(process.pid)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + LEADER_TIMEOUT
        while process.alive():
            for child in process.children():
                ns = _pid_namespace(child.pid)
                if ns is not None and ns != own and _comm(child.pid) != "systemd-nspawn":
                    return child
            if loop.time() > deadline:
                said = await in_thread(log_reason, console)
                raise GuestStartFailed(
                    "boot",
                    f"systemd-nspawn did not start the container within {LEADER_TIMEOUT:g} s"
                    + (f":\n{said}" if said else ""),
                )
            await asyncio.sleep(0.02)
        # its init may have exited already (a fatal error of the guest's systemd): what
        # the console says is the cause, not nspawn's clean-up after it
        said = await in_thread(log_reason, console)
        raise GuestStartFailed(
            "boot",
            "systemd-nspawn exited before the container started" + (f":\n{said}" if said else ""),
        )

    @staticmethod
    async def _remove_cgroups(guest: GuestState) -> None:
        """Kill what is left of the guest (everything it started is in its cgroups) and
        remove its cgroups."""
        await asyncio.to_thread(cgroups.remove, guest.resources.get("cgroups", []))
        guest.resources.pop("cgroups", None)

    async def _kill(self, process: ProcessRef) -> None:
        for child in process.children():
            child.signal(signal.SIGKILL)
        process.signal(signal.SIGKILL)
        await process.wait(5)

    async def _shutdown(self, guest: GuestState, graceful: bool = True) -> None:
        """Stop the guest, then unmount its disk layer and remove its network; every part
        may already be gone. Graceful: an orderly poweroff (nspawn turns SIGTERM into one),
        forced after the stop timeout. Not graceful (destroy: the disk layer is thrown away
        anyway): kill the container's PID 1 at once, which ends everything inside it."""
        process = self.process(guest)
        leader_data = guest.resources.get("leader")
        leader = ProcessRef.model_validate(leader_data) if leader_data else None
        if graceful and process is not None and process.signal(signal.SIGTERM):
            await process.wait(self.settings.stop_timeout)
        if leader is not None and leader.signal(signal.SIGKILL):
            await leader.wait(5)
        if process is not None and not await process.wait(5):
            process.signal(signal.SIGKILL)
            await process.wait(5)
        await _wait_until_empty(guest.resources.pop("pid_namespace", None))
        await self._remove_cgroups(guest)
        guest.resources.pop("process", None)
        guest.resources.pop("leader", None)
        folder = self.guest_dir(guest.guest_id)
        with contextlib.suppress(CommandError):
            await self._unmount_overlay(folder)
        for target in (folder / "rootfs", folder / "lower"):  # "lower": a start cut short
            if _is_mountpoint(target):
                await arun(["umount", "--lazy", target])
        await in_thread(disklayer.unmount, folder)  # the image file stays: it is the guest's disk
        try:
            await self.network_down(guest)
        except NetworkError:
            await asyncio.sleep(0.2)  # the namespace may be held a moment by exiting processes
            await self.network_down(guest)


@contextmanager
def image_view(image_root: Path, target: Path, uid_base: int) -> Iterator[Path]:
    """The image's rootfs at ``target`` while the block runs: ID-mapped to ``uid_base`` and
    read-only, so that nothing reaches the shared image through a guest's folder (a removal
    of the folder that ran into this mount would otherwise empty the image). Detached after,
    lazily if something holds it."""
    idmap.mount_idmapped(image_root, target, uid_base)
    try:
        run(["mount", "-o", "remount,bind,ro", target])
        yield target
    finally:
        try:
            run(["umount", target])
        except CommandError:
            run(["umount", "--lazy", target])


def _pid_namespace(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


async def _wait_until_empty(pid_namespace: str | None, timeout: float = 10.0) -> None:
    """Wait until no process is left in the guest's PID namespace (processes of a killed
    namespace take a moment to go)."""
    if pid_namespace is None:
        return
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        # a walk over every process on the host: in a worker thread
        if not await asyncio.to_thread(_has_processes, pid_namespace):
            return
        await asyncio.sleep(0.05)


def _has_processes(pid_namespace: str) -> bool:
    return any(
        _pid_namespace(int(p.name)) == pid_namespace
        for p in os.scandir("/proc")
        if p.name.isdigit()
    )


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _is_mountpoint(path: Path) -> bool:
    target = str(path)
    with open("/proc/self/mounts") as fh:
        return any(line.split()[1] == target for line in fh)
