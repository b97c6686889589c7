"""Host firewall rules for guest links (nftables), so isolation does not depend on how the
host happens to be configured (a host with IP forwarding on, say, for other containers).

One table, ``inet master_controller``, replaced atomically:

- forward: nothing is routed to or from a guest link (``mcv*``): guests cannot reach each
  other or anything beyond the host through it, and nothing beyond the host (another
  container, a machine on its network) reaches a guest. So a guest's services on its
  address (its VNC server, which the relay connects to; websockify; the agent) answer the
  host alone;
- input: a guest cannot open connections to the host, except to its own controller's egress
  proxy port: the set ``guest_egress`` holds (guest link, port) pairs, one per running guest,
  added when its link comes up and removed with it; replies to connections the host opened
  (the controller reaching the guest's VNC, websockify and agent) pass.

The allowance lives and dies with the guest's link, so a port a controller once used (or a
test's random one) never stays open to guests; controllers with different ports coexist.
The table is replaced only when its rules are of another version.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import weakref

from master_controller.commands import arun
from master_controller.errors import CommandError, NetworkError

TABLE = "master_controller"
GUEST_LINKS = "mcv*"

VERSION = "mc-rules-3"

RULESET = f"""table inet {TABLE} {{}}
delete table inet {TABLE}
table inet {TABLE} {{
    comment "{VERSION}"
    set guest_egress {{
        type ifname . inet_service
    }}
    chain forward {{
        type filter hook forward priority filter; policy accept;
        iifname "{GUEST_LINKS}" drop
        oifname "{GUEST_LINKS}" drop
    }}
    chain input {{
        type filter hook input priority filter; policy accept;
        iifname "{GUEST_LINKS}" ct state established,related accept
        iifname . tcp dport @guest_egress accept
        iifname "{GUEST_LINKS}" drop
    }}
}}
"""


def available() -> bool:
    return shutil.which("nft") is not None


# one check-and-replace at a time in this process: two boots that both found no table must
# not both replace it (the second would drop the allowance the first added). One lock per
# event loop: a lock waited on in one loop cannot be used from another (tools and tests run
# several loops, one after the other).
_installing: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
    weakref.WeakKeyDictionary()
)


def _install_lock() -> asyncio.Lock:
    loop = asyncio.get_running_loop()
    lock = _installing.get(loop)
    if lock is None:
        lock = _installing[loop] = asyncio.Lock()
    return lock


async def ensure_isolation() -> bool:
    """Install the guest isolation rules (one nftables transaction) unless this version is
    there already. True when the table was (re)placed: every allowance in it is gone, and
    the caller adds back those of its running guests."""
    async with _install_lock():
        try:
            try:
                current = await arun(["nft", "list", "table", "inet", TABLE], timeout=10)
            except CommandError:
                current = ""
            if VERSION in current:
                return False
            await arun(["nft", "-f", "-"], input_text=RULESET, timeout=10)
            return True
        except CommandError as exc:
            raise NetworkError(f"installing the guest firewall rules: {exc.reason}") from exc


def _in_set(host_ifname: str, port: int) -> list[str]:
    """``element inet master_controller guest_egress { "<link>" . <port> }``"""
    if not host_ifname.isalnum():
        raise NetworkError(f"not a guest link name: {host_ifname!r}")
    return ["element", "inet", TABLE, "guest_egress", f'{{ "{host_ifname}" . {int(port)} }}']


async def allow_egress(host_ifname: str, port: int) -> None:
    """Let the guest behind ``host_ifname`` open connections to ``port`` on the host."""
    try:
        await arun(["nft", "add", *_in_set(host_ifname, port)], timeout=10)
    except CommandError as exc:
        raise NetworkError(f"allowing {host_ifname} its egress port: {exc.reason}") from exc


async def forget_egress(host_ifname: str, port: int) -> None:
    """Remove the guest link's allowance (nothing to do if it is gone already)."""
    with contextlib.suppress(CommandError):
        await arun(["nft", "delete", *_in_set(host_ifname, port)], timeout=10)
