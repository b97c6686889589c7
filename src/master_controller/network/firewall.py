"""Host firewall rules for guest links (nftables), so isolation does not depend on how the
host happens to be configured (a host with IP forwarding on, say, for other containers).

One table, ``inet master_controller``, replaced atomically:

- forward: nothing is routed to or from a guest link (``mcv*``): guests cannot reach each
  other or anything beyond the host through it;
- input: a guest cannot open connections to the host, except to the egress proxy's port
  (the ports in the set ``egress_ports``); replies to connections the host opened (the
  controller reaching websockify and the agent) pass.

The table is replaced only when its rules are of another version; otherwise a controller
just adds its egress port to the set, so controllers with different ports coexist.
"""

from __future__ import annotations

import shutil

from master_controller.commands import arun
from master_controller.errors import CommandError, NetworkError

TABLE = "master_controller"
GUEST_LINKS = "mcv*"

VERSION = "mc-rules-2"

RULESET = f"""table inet {TABLE} {{}}
delete table inet {TABLE}
table inet {TABLE} {{
    comment "{VERSION}"
    set egress_ports {{
        type inet_service
    }}
    chain forward {{
        type filter hook forward priority filter; policy accept;
        iifname "{GUEST_LINKS}" drop
        oifname "{GUEST_LINKS}" drop
    }}
    chain input {{
        type filter hook input priority filter; policy accept;
        iifname "{GUEST_LINKS}" ct state established,related accept
        iifname "{GUEST_LINKS}" tcp dport @egress_ports accept
        iifname "{GUEST_LINKS}" drop
    }}
}}
"""


def available() -> bool:
    return shutil.which("nft") is not None


async def ensure_isolation(egress_port: int = 0) -> None:
    """Install the guest isolation rules (one nftables transaction) unless this version is
    there already, and let guests reach ``egress_port`` on the host (0: no egress)."""
    try:
        try:
            current = await arun(["nft", "list", "table", "inet", TABLE], timeout=10)
        except CommandError:
            current = ""
        if VERSION not in current:
            await arun(["nft", "-f", "-"], input_text=RULESET, timeout=10)
        if egress_port:
            element = f"{{ {int(egress_port)} }}"
            await arun(
                ["nft", "add", "element", "inet", TABLE, "egress_ports", element], timeout=10
            )
    except CommandError as exc:
        raise NetworkError(f"installing the guest firewall rules: {exc.reason}") from exc
