"""Host firewall rules for guest links (nftables), so isolation does not depend on how the
host happens to be configured (a host with IP forwarding on, say, for other containers).

One table, ``inet master_controller``, replaced atomically:

- forward: nothing is routed to or from a guest link (``mcv*``): guests cannot reach each
  other or anything beyond the host through it;
- input: a guest cannot open connections to the host; replies to connections the host
  opened (the controller reaching websockify and the agent) pass.
"""

from __future__ import annotations

import shutil

from master_controller.errors import CommandError, NetworkError
from master_controller.proc import run

TABLE = "master_controller"
GUEST_LINKS = "mcv*"

RULESET = f"""table inet {TABLE} {{}}
delete table inet {TABLE}
table inet {TABLE} {{
    chain forward {{
        type filter hook forward priority filter; policy accept;
        iifname "{GUEST_LINKS}" drop
        oifname "{GUEST_LINKS}" drop
    }}
    chain input {{
        type filter hook input priority filter; policy accept;
        iifname "{GUEST_LINKS}" ct state established,related accept
        iifname "{GUEST_LINKS}" drop
    }}
}}
"""


def available() -> bool:
    return shutil.which("nft") is not None


def ensure_isolation() -> None:
    """Install (or refresh) the guest isolation rules in one nftables transaction."""
    try:
        run(["nft", "-f", "-"], input_text=RULESET, timeout=10)
    except CommandError as exc:
        raise NetworkError(f"installing the guest firewall rules: {exc.reason}") from exc
