"""What every browser image must contain, independent of the recipe that built it.

Verification checks an image against this contract *and* against its own recipe: a recipe
that leaves out the VNC services (as the rebuild in the incident did) still fails here.

The guest is a credential-capture browser whose viewer is hostile by assumption, so the
contract also holds what keeps that viewer inside the sign-in (:func:`hardening_problems`):
Chromium's managed policy (no local files, internal pages or DevTools, nothing saved or
installed), a login terminal without a way to a shell, a window manager that starts nothing.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from master_controller.images.units import exec_start, parse_unit, unit_path
from mc_agent import AGENT_PORT, VNC_PORT, WEBSOCKIFY_PORT

REQUIRED_PACKAGES = (
    "systemd",
    "dbus",
    "python3",
    "xvfb",
    "openbox",
    "x11vnc",
    "websockify",
    "novnc",
    "chromium",
    "x11-utils",
)


@dataclass(frozen=True)
class UnitContract:
    name: str
    executable: str | None  # what ExecStart runs (None: a unit that runs nothing, a socket)
    required_args: tuple[str, ...] = ()
    one_of_args: tuple[str, ...] = ()  # at least one of these
    forbidden_args: tuple[str, ...] = ()
    environment: tuple[str, ...] = ()  # KEY=VALUE entries it must set
    after: tuple[str, ...] = ()  # units it must be ordered after
    ports: tuple[int, ...] = field(default=())  # listening ports the unit owns (documentation)
    # "Section.Key=value" lines it must have, e.g. "Socket.Accept=no"
    settings: tuple[str, ...] = ()
    # the target it must be enabled in (None: started by something else, e.g. its socket)
    enabled_in: str | None = "multi-user.target"


BROWSER_UNITS = (
    UnitContract(
        "mc-config.service", "/usr/bin/python3", required_args=("mc_agent", "apply-config")
    ),
    UnitContract(
        "xvfb.service",
        "/usr/bin/Xvfb",
        # the largest screen a viewer can ask for; -noreset keeps its RandR modes (display-size)
        required_args=(":1", "1920x1200x24", "-noreset"),
        after=("mc-config.service",),
    ),
    UnitContract(
        "openbox.service",
        "/usr/bin/openbox",
        # its own configuration: the stock one has a root menu that opens a shell
        required_args=("--config-file", "/usr/lib/mc/openbox-rc.xml"),
        environment=("DISPLAY=:1",),
        after=("xvfb.service",),
    ),
    UnitContract(
        "x11vnc.service",
        "/usr/bin/x11vnc",
        required_args=(
            "-display",
            ":1",
            "-rfbport",
            str(VNC_PORT),
            # no reverse DNS of clients: the guest has no DNS, and the lookup of the host's
            # address (the relay's) froze x11vnc for its resolver's timeout
            "-nolookup",
            "-forever",
            "-shared",
            # no clipboard over VNC: nothing copied in the guest may reach a viewer
            "-nosel",
            # a display resized to fit the viewer's window reaches the viewers
            "-xrandr",
        ),
        one_of_args=("-rfbauth", "-passwdfile"),
        # it listens on the guest's address (the relay connects to it): never without its
        # password, never handing a viewer the screen unasked
        forbidden_args=("-nopw", "-viewonly"),
        after=("xvfb.service", "mc-config.service"),
        ports=(VNC_PORT,),
    ),
    # noVNC's bridge in the guest, started by its socket on the first connection: it costs
    # nothing while unused (the controller's relay reaches x11vnc directly)
    UnitContract(
        "websockify.socket",
        None,
        settings=(f"Socket.ListenStream=0.0.0.0:{WEBSOCKIFY_PORT}", "Socket.Accept=no"),
        ports=(WEBSOCKIFY_PORT,),
        enabled_in="sockets.target",
    ),
    UnitContract(
        "websockify.service",
        "/usr/bin/websockify",
        required_args=("--inetd", "--web", f"127.0.0.1:{VNC_PORT}"),
        after=("x11vnc.service",),
        settings=("Service.StandardInput=socket",),
        enabled_in=None,
    ),
    UnitContract(
        "chromium.service",
        "/usr/bin/chromium",
        required_args=(
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ),
        # it runs as an unprivileged user, so its sandbox works in containers and VMs alike
        forbidden_args=("--no-sandbox",),
        environment=("DISPLAY=:1",),
        after=("openbox.service",),
    ),
    UnitContract(
        "mc-agent.service",
        "/usr/bin/python3",
        required_args=("mc_agent", "serve"),
        after=("mc-config.service",),
        ports=(AGENT_PORT,),
    ),
)


# --- what keeps the viewer inside the sign-in ------------------------------------------------

CHROMIUM_POLICY_DIR = "etc/chromium/policies/managed"
# every one of these must be in URLBlocklist (since Chromium 147 a bare "*" does not cover
# chrome:// URLs, so the internal schemes are named)
BLOCKED_URLS = (
    "file://*",
    "chrome://*",
    "chrome-untrusted://*",
    "chrome-extension://*",
    "devtools://*",
    "view-source:*",
    "filesystem:*",
)
# exact values the merged policy must have
REQUIRED_POLICY: dict[str, object] = {
    "DeveloperToolsAvailability": 2,  # DevTools disallowed everywhere
    "RemoteDebuggingAllowed": False,
    "DownloadRestrictions": 3,  # no downloads at all
    "AllowFileSelectionDialogs": False,  # no file pickers (uploads, "save as", ctrl+o)
    "ExtensionInstallBlocklist": ["*"],
    "PasswordManagerEnabled": False,
    "PrintingEnabled": False,
    "BrowserGuestModeEnabled": False,
    "BrowserAddPersonEnabled": False,
    "IncognitoModeAvailability": 1,  # one profile only: the one the wipe removes
    "BrowserSignin": 0,
    "SyncDisabled": True,
    "DefaultFileSystemReadGuardSetting": 2,  # the File System Access API
    "DefaultFileSystemWriteGuardSetting": 2,
}
LOGIN_TMUX_CONF = "usr/lib/mc/login-tmux.conf"
REQUIRED_TMUX_LINES = (
    "set -g prefix None",
    "set -g prefix2 None",
    "unbind-key -a -T prefix",
    "unbind-key -a -T root",
    "unbind-key -a -T copy-mode",
    "unbind-key -a -T copy-mode-vi",
    "set -g mouse off",
    "set -g default-shell /usr/sbin/nologin",
    "set -g remain-on-exit on",
)
OPENBOX_RC = "usr/lib/mc/openbox-rc.xml"
# window manager actions that start programs, open menus (whose items start programs) or
# restart it; and Iconify: without a panel a hidden window could not come back
FORBIDDEN_OPENBOX_ACTIONS = frozenset(
    {"Execute", "ShowMenu", "Restart", "Reconfigure", "Exit", "SessionLogout", "Iconify"}
)


def hardening_problems(rootfs: Path) -> list[str]:
    """What the image at ``rootfs`` lacks of the hardening above (empty: nothing)."""
    return [
        *_policy_problems(rootfs),
        *_start_page_problems(rootfs),
        *_tmux_problems(rootfs),
        *_openbox_problems(rootfs),
    ]


def chromium_policy(rootfs: Path) -> dict[str, object]:
    """Chromium's managed policy as Chromium sees it: every JSON file of the folder."""
    merged: dict[str, object] = {}
    folder = rootfs / CHROMIUM_POLICY_DIR
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        data = json.loads(path.read_text())
        if isinstance(data, dict):
            merged.update(data)
    return merged


def _policy_problems(rootfs: Path) -> list[str]:
    try:
        policy = chromium_policy(rootfs)
    except (OSError, ValueError) as exc:
        return [f"chromium policy unreadable: {exc}"]
    if not policy:
        return [f"no chromium policy in /{CHROMIUM_POLICY_DIR}"]
    problems = [
        f"chromium policy {key} is {policy.get(key)!r}, not {value!r}"
        for key, value in REQUIRED_POLICY.items()
        if policy.get(key) != value
    ]
    blocked = policy.get("URLBlocklist")
    blocked = blocked if isinstance(blocked, list) else []
    if missing := [u for u in BLOCKED_URLS if u not in blocked]:
        problems.append(f"chromium policy URLBlocklist lacks {', '.join(missing)}")
    allowed = policy.get("URLAllowlist")
    schemes = tuple(u.split(":", 1)[0] + ":" for u in BLOCKED_URLS)
    for entry in allowed if isinstance(allowed, list) else []:
        if str(entry).startswith(schemes):
            problems.append(f"chromium policy URLAllowlist re-allows {entry}")
    return problems


def _start_page_problems(rootfs: Path) -> list[str]:
    path = unit_path(rootfs, "chromium.service")
    if path is None:
        return []  # the unit check says so
    argv = exec_start(parse_unit(path.read_text()))
    if local := [a for a in argv if a.startswith(("file:", "chrome:", "about:"))]:
        return [f"chromium.service opens {local[0][:60]} (blocked by policy: a data: URL)"]
    return []


def _tmux_problems(rootfs: Path) -> list[str]:
    path = rootfs / LOGIN_TMUX_CONF
    if not path.is_file():
        return [f"/{LOGIN_TMUX_CONF} is missing"]
    lines = {line.strip() for line in path.read_text().splitlines()}
    return [
        f"/{LOGIN_TMUX_CONF} lacks {want!r}" for want in REQUIRED_TMUX_LINES if want not in lines
    ]


def _openbox_problems(rootfs: Path) -> list[str]:
    path = rootfs / OPENBOX_RC
    try:
        tree = ET.parse(path)  # noqa: S314 (the image's own file, written by its builder)
    except (OSError, ET.ParseError) as exc:
        return [f"/{OPENBOX_RC} is missing or not XML: {exc}"]
    actions = {el.get("name", "") for el in tree.iter() if el.tag.endswith("action")}
    if bad := sorted(actions & FORBIDDEN_OPENBOX_ACTIONS):
        return [f"/{OPENBOX_RC} binds {', '.join(bad)}"]
    return []
