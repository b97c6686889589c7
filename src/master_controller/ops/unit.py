"""The systemd unit master-controller runs as, and the example config file.

Why the unit looks as it does (each line was tried under a real systemd, see
``tests/ops/test_systemd.py``):

- ``Delegate=yes``: each container guest gets a cgroup below the controller's own (see
  ``runtimes/cgroups.py``); systemd must leave that subtree to the controller.
- ``KillMode=process``: a stop or restart signals the controller's main process only. Guests
  (nspawn, QEMU) are its children in the unit's cgroup; any other kill mode ends every guest
  with every restart, and a deploy would drop every session. The controller reattaches to
  them when it starts again.
  Not on a cgroup2 host while container guests run, though: the unit's cgroup then gives
  memory/pids/cpu to their cgroups, cgroup2 lets no process into such a cgroup, and systemd
  before 254 (Debian 12 has 252) puts a restarted service's main process exactly there, so
  the start fails (219/CGROUP; systemd issues 24064, 41278). ``deploy`` refuses to restart
  then (:func:`~master_controller.ops.deploy.restart_blocker`). The way out is each
  container guest in a scope of its own (``systemd-run --scope -p Delegate=yes``), which a
  restart of the service leaves alone; that is the container runtime's to do. QEMU guests
  have no cgroups of their own and are not affected.
- ``OOMPolicy=continue``: a guest that hits its memory limit is an OOM kill inside the unit's
  cgroup; the default policy would stop the whole service for it.
- ``TasksMax=infinity``: guests' tasks count against the unit; each guest has its own
  ``pids.max`` (``guest_pids_max``) and the host's capacity is ``max_sessions``.
- No ``ProtectSystem=``, ``PrivateTmp=``, ``ReadWritePaths=``, ``ProtectHome=``: each of
  them gives the service a mount namespace of its own, and the controller mounts what guests
  run on (overlays, disk layers, ``/run/netns``). systemd sets that namespace up as a slave of
  the host's, so those mounts would never reach the host: after a restart the next
  controller (in a fresh namespace) could not see, reach or unmount its running guests.
- No ``NoNewPrivileges=``, ``SystemCallFilter=``, ``RestrictSUIDSGID=``, ``DeviceAllow=``,
  ``ProtectClock=``, ``ProtectHostname=``, ``MemoryDenyWriteExecute=``: guests inherit
  them (seccomp filters and the no-new-privileges bit are inherited across exec, a device
  policy applies to the whole cgroup subtree), and Chromium's sandbox, the guest's systemd
  or QEMU's ``/dev/kvm`` would break. The isolation that matters is around each guest.
- ``UMask=0077``: what the controller writes is its own (``serve`` sets it too).
"""

from __future__ import annotations

import json
import textwrap
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

from pydantic import SecretStr
from pydantic_core import PydanticUndefined

from master_controller.settings import REPO_ROOT, Settings

SERVICE = "master-controller"
UNIT_FILE = Path("etc/systemd/system") / f"{SERVICE}.service"

UNIT_TEMPLATE = """\
# Written by `master-controller install`; rewritten by the next install (put changes in a
# drop-in: systemctl edit {service}).
[Unit]
Description=master-controller: disposable sign-in browsers
Documentation=file://{deploy_dir}/current/README.md
After=network-online.target
Wants=network-online.target

[Service]
Type=exec
Environment=MC_CONFIG={config}
Environment=PYTHONUNBUFFERED=1
WorkingDirectory={deploy_dir}/current
ExecStart={deploy_dir}/current/.venv/bin/master-controller serve
Restart=on-failure
RestartSec=2
TimeoutStopSec=30
# guests have cgroups of their own below this unit's, and outlive a restart
Delegate=yes
KillMode=process
OOMPolicy=continue
TasksMax=infinity
LimitNOFILE=1048576
UMask=0077

[Install]
WantedBy=multi-user.target
"""


def unit_text(settings: Settings, config: Path) -> str:
    """The unit for ``settings`` (its deploy dir) reading its settings from ``config``."""
    for path in (settings.deploy_dir, config):
        if not path.is_absolute() or any(c.isspace() or c in "%$\\\"'" for c in str(path)):
            raise ValueError(f"{path}: a unit needs an absolute path without blanks or quotes")
    return UNIT_TEMPLATE.format(service=SERVICE, deploy_dir=settings.deploy_dir, config=config)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path | IPv4Network):
        return json.dumps(str(value))  # a TOML basic string is JSON's string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return (
            "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
        )
    raise TypeError(f"no TOML form for {value!r}")


def example_config() -> str:
    """The documented example config: every setting with its help and default, commented
    out (so the defaults keep following the release that runs). Made from the fields of
    :class:`Settings`, where each setting is declared once."""
    lines = [
        "# master-controller settings (TOML). Every setting, with its default; uncomment what",
        "# you change. Environment variables MC_<NAME> override this file.",
        "# This file may hold secrets (vault_key): keep it 0600, owned by root.",
    ]
    for name, field in Settings.model_fields.items():
        lines.append("")
        help_text = field.description or ""
        lines += [f"# {line}" for line in textwrap.wrap(help_text, 88)]
        default = field.default
        if default is PydanticUndefined and field.default_factory is not None:
            lines.append(f"# {name} = ...  (default: computed on this host at start)")
        elif isinstance(default, Path) and default.is_relative_to(REPO_ROOT):
            relative = default.relative_to(REPO_ROOT)
            lines.append(f"# {name} = ...  (default: {relative} of the running release)")
        elif default is None or isinstance(default, SecretStr):
            lines.append(f"# {name} = ...  (not set by default)")
        else:
            lines.append(f"# {name} = {_toml_value(default)}")
    return "\n".join(lines) + "\n"
