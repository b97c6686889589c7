"""The guest address allocator. Leases are persisted, so a restarted controller knows them.

The guest network (a setting, default 10.213.0.0/16) is cut into /30 blocks, one per guest:
``.1`` is the host end of the guest's veth, ``.2`` the guest. A /30 per guest means no two
guests share a link, so they cannot reach each other at layer 2.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import BinaryIO

from master_controller.errors import AddressPoolExhausted, NetworkError

PREFIX = 30


@dataclass(frozen=True)
class Lease:
    guest_id: str
    index: int
    subnet: str
    host_address: str
    guest_address: str
    prefixlen: int = PREFIX

    @classmethod
    def for_index(cls, network: IPv4Network, guest_id: str, index: int) -> Lease:
        base = int(network.network_address) + index * 4
        return cls(
            guest_id=guest_id,
            index=index,
            subnet=f"{IPv4Address(base)}/{PREFIX}",
            host_address=str(IPv4Address(base + 1)),
            guest_address=str(IPv4Address(base + 2)),
        )


class AddressAllocator:
    """Allocates one /30 per guest id; leases live in a JSON file guarded by a file lock."""

    def __init__(self, network: IPv4Network, path: Path) -> None:
        if network.prefixlen > PREFIX:
            raise NetworkError(f"guest network {network} is smaller than one /{PREFIX}")
        self.network = network
        self.path = path
        self.capacity = 2 ** (PREFIX - network.prefixlen)

    @contextmanager
    def _locked(self) -> Iterator[dict[str, int]]:
        # The lease file maps guest ids to addresses: the controller's alone (0600 in a
        # 0700 folder, whatever the umask of whoever runs this).
        if not self.path.parent.exists():
            self.path.parent.mkdir(mode=0o700, parents=True)
        with _private_file(self.path.with_suffix(".lock"), os.O_RDWR) as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            leases: dict[str, int] = (
                json.loads(self.path.read_text()) if self.path.is_file() else {}
            )
            before = dict(leases)
            yield leases
            if leases != before:
                tmp = self.path.with_suffix(".tmp")
                tmp.unlink(missing_ok=True)
                with _private_file(tmp, os.O_WRONLY | os.O_EXCL) as out:
                    out.write(json.dumps(leases, indent=1, sort_keys=True).encode())
                tmp.replace(self.path)

    def allocate(self, guest_id: str) -> Lease:
        """The guest's lease: its existing one, or the lowest free block."""
        with self._locked() as leases:
            if guest_id in leases:
                return Lease.for_index(self.network, guest_id, leases[guest_id])
            used = set(leases.values())
            index = next((i for i in range(self.capacity) if i not in used), None)
            if index is None:
                raise AddressPoolExhausted(
                    f"all {self.capacity} guest addresses of {self.network} are leased"
                )
            leases[guest_id] = index
            return Lease.for_index(self.network, guest_id, index)

    def release(self, guest_id: str) -> None:
        with self._locked() as leases:
            leases.pop(guest_id, None)

    def leases(self) -> list[Lease]:
        with self._locked() as leases:
            return [Lease.for_index(self.network, g, i) for g, i in sorted(leases.items())]


def lease_dict(lease: Lease) -> dict[str, object]:
    return asdict(lease)


def _private_file(path: Path, flags: int) -> BinaryIO:
    """``path`` opened (created 0600 if missing) with ``flags``."""
    fd = os.open(path, flags | os.O_CREAT | os.O_CLOEXEC, 0o600)
    return os.fdopen(fd, "wb" if flags & os.O_WRONLY else "r+b")
