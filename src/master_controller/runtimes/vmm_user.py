"""Who a guest's VMM (QEMU, Firecracker) runs as, and who may read the guest's files.

A VMM runs as an unprivileged host UID of its own: the first UID of the guest's slot in
:mod:`.idmap` (slot = address lease, unique among live guests of every runtime), so no two
guests share a UID and none runs as root. Its GID is the same number. A VMM taken over by its
guest is then one more unprivileged local user, in the guest's network namespace, under a
seccomp filter (QEMU) or a chroot (Firecracker's jailer).

The guest's folder holds its secrets (the config drive carries the agent token and the VNC
password; disks and memory snapshots carry whatever the guest holds): it is 0700 and every
file in it 0600, owned by root, so neither other local users nor the VMM can reach it by path.
"""

from __future__ import annotations

import os
from pathlib import Path

from master_controller.runtimes.idmap import FIRST, base_for

# The KVM probe boot runs unprivileged too, so that it proves what guests get; it uses a UID
# just below the guests' ranges, which no guest has.
PROBE_UID = FIRST - 1


def vmm_uid(lease: int) -> int:
    """The host UID (and GID) of the VMM of the guest holding address lease ``lease``."""
    return base_for(lease)


def make_private(folder: Path) -> None:
    """``folder`` 0700 and each regular file directly in it 0600 (a guest made by an older
    version may have 0755 and 0644)."""
    folder.chmod(0o700)
    for entry in os.scandir(folder):
        if entry.is_file(follow_symlinks=False):
            os.chmod(entry.path, 0o600)
