"""Kernel same-page merging (KSM) of guest memory, when the operator turns it on.

Guests boot the same image to the same screen, so much of their memory is identical: with
``guest_memory_merging`` the kernel may keep one copy of such pages for all guests (bench/
memory.py measured 28 MiB less PSS per container guest with three guests, after one scan).
It is off by default: a merged page is shared between tenants, and a guest can time a
write to learn whether another guest holds a page of the same content (a cross-tenant side
channel), so an operator decides. The kernel's own switch (``/sys/kernel/mm/ksm/run``) is
the host's: this module reads it and never flips it.

- container guests: nspawn starts with the process flag PR_SET_MEMORY_MERGE (Linux 6.4+),
  which every process of the guest inherits;
- QEMU guests: ``-machine mem-merge=on|off`` (QEMU's own default is on, so without it the
  choice would have been the host's ksmd alone).
"""

from __future__ import annotations

import sys
from pathlib import Path

KSM_RUN = Path("/sys/kernel/mm/ksm/run")
PR_SET_MEMORY_MERGE = 67

# sets the flag on itself, then becomes ``argv`` (the flag outlives exec and passes to
# children); a kernel without it fails the start with the reason
_SET_AND_EXEC = (
    "import ctypes, os, sys\n"
    f"if ctypes.CDLL(None, use_errno=True).prctl({PR_SET_MEMORY_MERGE}, 1, 0, 0, 0) != 0:\n"
    "    sys.exit('this kernel cannot merge a process memory (PR_SET_MEMORY_MERGE: '\n"
    "             + os.strerror(ctypes.get_errno()) + '); turn guest_memory_merging off')\n"
    "os.execvp(sys.argv[1], sys.argv[1:])\n"
)


def merging(argv: list[str]) -> list[str]:
    """``argv`` started with its memory (and all its children's) open to merging."""
    return [sys.executable, "-c", _SET_AND_EXEC, *argv]


def kernel_state() -> str:
    """What the host's KSM does: "merging", "stopped" (run is 0 or 2), or "unavailable"."""
    try:
        run = KSM_RUN.read_text().strip()
    except OSError:
        return "unavailable"
    return "merging" if run == "1" else "stopped"
