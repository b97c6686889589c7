"""What the runtimes whose guests run as processes on this host share (container, qemu):
a folder per guest, an address lease, a network namespace, one VMM/container process."""

from __future__ import annotations

import asyncio
from abc import abstractmethod
from collections.abc import Sequence
from contextlib import AsyncExitStack, ExitStack
from pathlib import Path
from typing import Any, ClassVar

from master_controller.commands import in_thread
from master_controller.diskspace import MIB, REMEDY, file_bytes, full_reason, is_full_error
from master_controller.errors import (
    GuestStartFailed,
    GuestStateError,
    HibernateFailed,
    MCError,
)
from master_controller.images.store import ImageInfo, ImageStore
from master_controller.network import firewall, netns
from master_controller.network.ipam import AddressAllocator
from master_controller.network.netns import GuestLink
from master_controller.process import ProcessRef, reap
from master_controller.runtimes.base import GuestSecrets, GuestState, GuestStatus, Runtime
from master_controller.runtimes.guest_folder import remove_guest_folder
from master_controller.settings import Settings
from master_controller.steps import StepLog
from mc_agent.config import GuestConfig


class HostedRuntime(Runtime):
    # True when the guest puts its address on its own NIC (a VM); False when the host
    # addresses the guest's end of the link before it boots (a container).
    guest_configures_network: ClassVar[bool] = False

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.images = ImageStore(settings.images_dir)
        self.addresses = AddressAllocator(
            settings.guest_network, settings.data_dir / "network" / "leases.json"
        )

    @abstractmethod
    def prepare(
        self, folder: Path, image: ImageInfo, config: GuestConfig, steps: StepLog
    ) -> dict[str, Any]:
        """Make the guest's runtime-specific files (disk layer, config source) in ``folder``;
        returns what to record in the guest's resources."""

    async def create(
        self, guest_id: str, image_id: str, secrets: GuestSecrets, steps: StepLog | None = None
    ) -> GuestState:
        # all file work and commands (a disk copy, mkfs, qemu-img): off the event loop
        return await in_thread(self._create, guest_id, image_id, secrets, steps or StepLog())

    def _create(
        self, guest_id: str, image_id: str, secrets: GuestSecrets, steps: StepLog
    ) -> GuestState:
        image = self.images.get(image_id)
        folder = self.guest_dir(guest_id)
        if folder.exists():
            raise GuestStateError(f"guest {guest_id} exists already")
        with ExitStack() as undo:
            with steps.step("allocate"):
                folder.mkdir(parents=True)
                undo.callback(remove_guest_folder, folder)
                lease = self.addresses.allocate(guest_id)
                undo.callback(self.addresses.release, guest_id)
            own_network = self.guest_configures_network
            config = GuestConfig(
                guest_id=guest_id,
                vnc_password=secrets.vnc_password,
                agent_token=secrets.agent_token,
                address=f"{lease.guest_address}/{lease.prefixlen}" if own_network else None,
                gateway=lease.host_address if own_network else None,
                egress_proxy=(
                    f"http://{lease.host_address}:{self.settings.egress_port}"
                    if self.settings.egress_port
                    else None
                ),
            )
            resources = self.prepare(folder, image, config, steps)
            link = GuestLink.for_guest(guest_id)
            guest = GuestState(
                guest_id=guest_id,
                runtime=self.name,
                image_id=image.id,
                address=lease.guest_address,
                secrets=secrets,
                resources={
                    "lease": lease.index,
                    "namespace": link.namespace,
                    "host_ifname": link.host_ifname,
                    **resources,
                },
            )
            self.save(guest)
            undo.pop_all()
        return guest

    @abstractmethod
    async def _shutdown(self, guest: GuestState, graceful: bool) -> None:
        """Stop the guest's VMM or container (its disk stays) and remove its network."""

    async def destroy(self, guest: GuestState) -> None:
        await self._shutdown(guest, graceful=False)
        reap()
        self.addresses.release(guest.guest_id)
        await asyncio.to_thread(remove_guest_folder, self.guest_dir(guest.guest_id))
        guest.status = GuestStatus.DESTROYED

    def check_startable(self, guest: GuestState) -> None:
        if guest.status not in (GuestStatus.CREATED, GuestStatus.STOPPED, GuestStatus.DEAD):
            raise GuestStateError(f"guest {guest.guest_id} is {guest.status}, cannot start")

    async def network_up(
        self,
        guest: GuestState,
        undo: AsyncExitStack,
        tap: str | None = None,
        reuse: bool = False,
        tap_owner: int | None = None,
    ) -> GuestLink:
        """The guest's isolated network, removed by ``undo`` if the start fails later. A
        network left by a guest that died is replaced (found by its recorded ids only);
        with ``reuse`` (a resume) an existing one is kept, with its addresses and MACs."""
        if await firewall.ensure_isolation():
            await self._allow_running_guests(guest)
        link = self.link(guest)
        lease = self.addresses.allocate(guest.guest_id)
        exists = await netns.aexists(link)
        if exists and not reuse:
            await self.remove_link(link)
        undo.push_async_callback(self.remove_link, link)  # first: a cancelled create is undone
        if not exists or not reuse:
            await netns.acreate(link, lease, tap=tap, tap_owner=tap_owner)
        if self.settings.egress_port:
            await firewall.allow_egress(link.host_ifname, self.settings.egress_port)
        return link

    async def _allow_running_guests(self, starting: GuestState) -> None:
        """After the firewall table was replaced (a first start, or rules of another
        version): the egress allowances of this runtime's other guests, added back."""
        if not self.settings.egress_port:
            return
        for other in self.guests():
            ifname = other.resources.get("host_ifname")
            if other.guest_id == starting.guest_id or not ifname:
                continue
            if self.status(other) == GuestStatus.RUNNING:
                await firewall.allow_egress(ifname, self.settings.egress_port)

    async def network_down(self, guest: GuestState) -> None:
        """Remove the guest's network and its allowance to reach the egress proxy."""
        await self.remove_link(self.link(guest))

    async def remove_link(self, link: GuestLink) -> None:
        if self.settings.egress_port:
            await firewall.forget_egress(link.host_ifname, self.settings.egress_port)
        await netns.aremove(link)

    def link(self, guest: GuestState) -> GuestLink:
        return GuestLink(
            namespace=guest.resources["namespace"], host_ifname=guest.resources["host_ifname"]
        )

    def process(self, guest: GuestState) -> ProcessRef | None:
        data = guest.resources.get("process")
        return ProcessRef.model_validate(data) if data else None

    def status(self, guest: GuestState) -> GuestStatus:
        if guest.status == GuestStatus.RUNNING:
            process = self.process(guest)
            if process is None or not process.alive():
                return GuestStatus.DEAD
        return guest.status

    def start_failed(self, guest: GuestState, step: str, exc: BaseException) -> GuestStartFailed:
        """Record a failed start (its resources are released already) and say why."""
        reason = exc.reason if isinstance(exc, MCError) else str(exc)
        guest.status = GuestStatus.STOPPED
        guest.reason = reason
        guest.resources.pop("process", None)
        guest.resources.pop("leader", None)
        self.save(guest)
        return GuestStartFailed(step, reason)


def discard_failed_save(folder: Path, exc: MCError, names: Sequence[str]) -> HibernateFailed:
    """After saving a paused guest failed: remove the partial files ``names`` in ``folder``
    and say why, in words (a full file system is named with what is free). The caller then
    lets the guest run on and raises what this returns."""
    written = sum(file_bytes(folder / name) for name in names)
    no_space = is_full_error(exc)
    reason = full_reason(folder, "saving the guest's memory") if no_space else exc.reason
    for name in names:
        (folder / name).unlink(missing_ok=True)
    reason += f"; the {written / MIB:.0f} MiB written were removed and the guest runs on"
    return HibernateFailed(f"{reason}; {REMEDY}" if no_space else reason, no_space)
