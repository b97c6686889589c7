"""A guest's network: its own namespace, joined to the host by a veth pair.

Host side: ``mcv<id>`` with the lease's ``.1``; guest side: ``eth0`` in namespace
``mc-<id>`` with ``.2`` and a default route to ``.1``. The controller reaches the guest's
ports through the host end; guests have no route to each other (the host does not forward
between guest links: see :mod:`master_controller.network.firewall`).
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass
from pathlib import Path

from pyroute2 import IPRoute, NetNS, config, netns
from pyroute2.netlink.exceptions import NetlinkError

from master_controller.commands import in_thread
from master_controller.errors import NetworkError
from master_controller.network.ipam import Lease

NETNS_DIR = Path("/run/netns")

# pyroute2 creates a namespace, and opens a socket in one, through a forked child that must
# answer within this many seconds (2 by default): while many guests boot on few cores the
# child is seen to take longer, and the start failed with "no response from the child"
config.default_communicate_timeout = 30
GUEST_IFNAME = "eth0"
BRIDGE = "br0"


@dataclass(frozen=True)
class GuestLink:
    namespace: str
    host_ifname: str

    @classmethod
    def for_guest(cls, guest_id: str) -> GuestLink:
        """Names derived from the whole guest id (interface names allow 15 characters)."""
        short = hashlib.sha256(guest_id.encode()).hexdigest()[:12]
        return cls(namespace=f"mc-{short}", host_ifname=f"mcv{short}")

    @property
    def namespace_path(self) -> Path:
        return NETNS_DIR / self.namespace

    def exists(self) -> bool:
        return self.namespace_path.exists() or _link_index(self.host_ifname) is not None


def _link_index(ifname: str) -> int | None:
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=ifname)
    return found[0] if found else None


def create(
    link: GuestLink, lease: Lease, tap: str | None = None, tap_owner: int | None = None
) -> None:
    """Create the namespace and veth pair and address both ends. Undoes itself on failure.

    With ``tap`` (VMs): the namespace's end is bridged with a tap device of that name
    instead of being addressed; the VM puts the guest address on its own NIC."""
    if link.exists():
        raise NetworkError(f"network of {link.namespace} exists already")
    with IPRoute() as ipr:
        if ipr.get_addr(address=lease.host_address):
            raise NetworkError(
                f"{lease.host_address} is already in use on this host (another data dir with "
                "the same guest_network?)"
            )
    try:
        netns.create(link.namespace)
        with IPRoute() as ipr:
            ipr.link(
                "add",
                ifname=link.host_ifname,
                kind="veth",
                peer={"ifname": GUEST_IFNAME, "net_ns_fd": link.namespace},
            )
            index = ipr.link_lookup(ifname=link.host_ifname)[0]
            ipr.addr("add", index=index, address=lease.host_address, prefixlen=lease.prefixlen)
            ipr.link("set", index=index, state="up")
        with NetNS(link.namespace) as ns:
            for ifname in ("lo", GUEST_IFNAME):
                ns.link("set", index=ns.link_lookup(ifname=ifname)[0], state="up")
            index = ns.link_lookup(ifname=GUEST_IFNAME)[0]
            if tap is None:
                ns.addr("add", index=index, address=lease.guest_address, prefixlen=lease.prefixlen)
                ns.route("add", dst="default", gateway=lease.host_address)
            else:
                # an unprivileged VMM (the jailed Firecracker) may attach only to its own tap
                owner = {} if tap_owner is None else {"uid": tap_owner, "gid": tap_owner}
                ns.link("add", ifname=tap, kind="tuntap", mode="tap", **owner)
                ns.link("add", ifname=BRIDGE, kind="bridge")
                bridge = ns.link_lookup(ifname=BRIDGE)[0]
                for port in (GUEST_IFNAME, tap):
                    ns.link("set", index=ns.link_lookup(ifname=port)[0], master=bridge)
                    ns.link("set", index=ns.link_lookup(ifname=port)[0], state="up")
                ns.link("set", index=bridge, state="up")
    except (NetlinkError, OSError) as exc:
        remove(link)
        raise NetworkError(f"creating network {link.namespace}: {exc}") from exc


def remove(link: GuestLink) -> None:
    """Remove the veth pair and the namespace; a part that is already gone is fine."""
    try:
        index = _link_index(link.host_ifname)
        if index is not None:
            with IPRoute() as ipr:
                ipr.link("del", index=index)
    except NetlinkError as exc:
        if exc.code != 19:  # ENODEV: gone with its peer's namespace
            raise NetworkError(f"removing {link.host_ifname}: {exc}") from exc
    if link.namespace_path.exists():
        try:
            netns.remove(link.namespace)
        except OSError as exc:
            raise NetworkError(f"removing namespace {link.namespace}: {exc}") from exc


async def acreate(
    link: GuestLink, lease: Lease, tap: str | None = None, tap_owner: int | None = None
) -> None:
    """:func:`create` from async code."""
    # pyroute2's synchronous sockets run an event loop of their own: a worker thread, waited
    # for to the end even by a cancelled caller, whose clean-up must not race it (removing a
    # namespace that is only then created)
    await in_thread(create, link, lease, tap, tap_owner)


async def aremove(link: GuestLink) -> None:
    await in_thread(remove, link)


async def aexists(link: GuestLink) -> bool:
    return await asyncio.to_thread(link.exists)


def namespaces() -> list[str]:
    return sorted(netns.listnetns())
