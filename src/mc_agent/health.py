"""What the agent reports about the guest: its services and the windows on the display."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

from mc_agent import VNC_PORT, WEBSOCKIFY_PORT

DISPLAY = ":1"
# window titles come from web pages (any site the viewer opens): bounded like all the
# agent says
MAX_WINDOWS = 64
MAX_TITLE = 256
MAX_CLASS = 64

# unit -> Debian package whose version is reported. websockify is socket-activated: its
# service runs only while someone uses it, so its socket (listening) is what is watched.
SERVICES: dict[str, str] = {
    "xvfb.service": "xvfb",
    "openbox.service": "openbox",
    "x11vnc.service": "x11vnc",
    "websockify.socket": "websockify",
    "chromium.service": "chromium",
}
# unit -> the TCP port it serves: "active" only says the process runs; a viewer needs the
# port to accept (a restarted x11vnc is active a moment before it listens)
LISTENS: dict[str, int] = {"x11vnc.service": VNC_PORT, "websockify.socket": WEBSOCKIFY_PORT}
TCP_LISTEN = "0A"  # the state column of /proc/net/tcp for a listening socket


def _run(
    argv: list[str],
    timeout: float = 5.0,
    env: dict[str, str] | None = None,
    any_status: bool = False,
) -> str:
    """The command's output ("" if it failed, unless ``any_status``: what it printed)."""
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, check=False, env=env
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout if done.returncode == 0 or any_status else ""


def service_states(units: list[str]) -> dict[str, dict[str, str]]:
    """Each unit's load and active state, from one ``systemctl show`` (a health check runs
    often, and on an emulated CPU every process started costs a noticeable fraction of a
    second)."""
    out = _run(["systemctl", "show", "--property=Id,LoadState,ActiveState,SubState", *units])
    found: dict[str, dict[str, str]] = {}
    for block in out.split("\n\n"):
        props = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
        if props.get("Id"):
            found[props["Id"]] = props
    return {unit: _summarise(unit, found.get(unit, {})) for unit in units}


def _summarise(unit: str, props: dict[str, str]) -> dict[str, str]:
    load = props.get("LoadState", "unknown")
    active = props.get("ActiveState", "unknown")
    if load == "not-found":
        summary = f"{unit} not installed"
    elif active == "active":
        summary = f"{unit} {'listening' if unit.endswith('.socket') else 'running'}"
    else:
        summary = f"{unit} {active} ({props.get('SubState', '?')})"
    return {"load": load, "active": active, "sub": props.get("SubState", ""), "summary": summary}


def listening_ports(tables: tuple[str, ...] = ("/proc/net/tcp", "/proc/net/tcp6")) -> set[int]:
    """The TCP ports something in this network namespace listens on (no process started)."""
    ports: set[int] = set()
    for table in tables:
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 3 and fields[3] == TCP_LISTEN:
                ports.add(int(fields[1].rpartition(":")[2], 16))
    return ports


def _check_listening(states: dict[str, dict[str, str]], ports: set[int]) -> None:
    """An active unit whose port does not accept yet is reported as starting, not running."""
    for unit, port in LISTENS.items():
        state = states.get(unit)
        if state and state["active"] == "active" and port not in ports:
            state["active"] = "activating"
            state["summary"] = f"{unit} running but not yet listening on port {port}"


_versions: dict[str, str] = {}


def package_versions(packages: tuple[str, ...]) -> dict[str, str]:
    """Installed versions, from one ``dpkg-query``, kept once read (packages do not change
    under a running guest; a failed read is tried again next time)."""
    if not all(package in _versions for package in packages):
        # exits 1 if one package is missing; the others are still listed
        out = _run(["dpkg-query", "-W", "-f=${Package} ${Version}\\n", *packages], any_status=True)
        if out:  # it ran: a package it did not list is not installed (not asked again)
            _versions.update((package, "") for package in packages)
        for line in out.splitlines():
            package, _, version = line.partition(" ")
            if version:
                _versions[package] = version
    return {package: _versions.get(package, "") for package in packages}


def windows(display: str = DISPLAY) -> list[dict[str, str]]:
    """Top-level client windows the window manager knows about, with their class and title."""
    env = {**os.environ, "DISPLAY": display}
    listing = _run(["xprop", "-root", "_NET_CLIENT_LIST"], env=env)
    result = []
    for wid in re.findall(r"0x[0-9a-f]+", listing)[:MAX_WINDOWS]:
        props = _run(["xprop", "-id", wid, "WM_CLASS", "_NET_WM_NAME"], env=env)
        wm_class = re.search(r'WM_CLASS\(STRING\) = "([^"]*)", "([^"]*)"', props)
        title = re.search(r'_NET_WM_NAME\(UTF8_STRING\) = "(.*)"', props)
        result.append(
            {
                "id": wid,
                "class": wm_class.group(2)[:MAX_CLASS] if wm_class else "",
                "title": title.group(1)[:MAX_TITLE] if title else "",
            }
        )
    return result


def report() -> dict[str, Any]:
    states = service_states(list(SERVICES))
    _check_listening(states, listening_ports())
    versions = package_versions(tuple(SERVICES.values()))
    services = {}
    for unit, package in SERVICES.items():
        services[unit.rpartition(".")[0]] = {**states[unit], "version": versions[package]}
    wins = windows()
    down = [s["summary"] for s in services.values() if s["active"] != "active"]
    return {
        "boot_id": Path("/proc/sys/kernel/random/boot_id").read_text().strip(),
        "status": "ok" if not down else "degraded",
        "problems": down,
        "services": services,
        "display": DISPLAY,
        "windows": wins,
    }
