"""Under a real systemd (issue 17 part 6): a throwaway Debian container with systemd as PID
1 gets the project by `master-controller install`, then releases by `deploy`; a release that
fails its health gate is rolled back by itself; a restart or a deploy leaves what runs in
the unit's delegated cgroup (the guests) alone.

Guests themselves cannot run inside this container (their cgroup controllers are not
delegated into it on a host like this one), so the gate here is `--gate liveness` and a
guest is stood in for by a process in the cgroup the runtime would give one:
``<unit cgroup>/mc-guests/<id>``. The session gate is tested against real guests in
``test_health_gate.py``. It also shows why the unit does without mount-namespace hardening.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import pytest

from master_controller.settings import REPO_ROOT, Settings
from tests.conftest import require_root, require_tools
from tests.ops.systemd_host import (
    booted,
    commit_change,
    source_repo,
    systemd_rootfs,
    wheelhouse,
)

pytestmark = pytest.mark.integration

CLI = "/opt/master-controller/current/.venv/bin/master-controller"
UNIT_CGROUP = "/sys/fs/cgroup/system.slice/master-controller.service"
# a guest as the runtime places one: a process in mc-guests/<id> below the controller's cgroup
STAND_IN = f"""
mkdir -p {UNIT_CGROUP}/mc-guests/stand-in
sh -c 'echo $$ > {UNIT_CGROUP}/mc-guests/stand-in/cgroup.procs; exec sleep 3600' \
    >/dev/null 2>&1 &
echo $!
"""
HEALTH_WAIT = """python3 - <<'EOF'
import time, urllib.request
started = time.monotonic()
while True:
    try:
        urllib.request.urlopen("http://127.0.0.1:4000/health", timeout=1)
        break
    except OSError:
        time.sleep(0.05)
print(f"healthy after {time.monotonic() - started:.2f}")
EOF"""


def _seconds(started: float) -> float:
    return round(time.monotonic() - started, 1)


def test_install_deploy_restart_and_automatic_rollback(
    tmp_path: Path, integration_settings: Settings, golden_image: str
) -> None:
    require_root()
    require_tools("systemd-nspawn", "mmdebstrap", "nsenter", "git")
    cache = integration_settings.cache_dir
    cache.mkdir(parents=True, exist_ok=True)
    rootfs, wheels = systemd_rootfs(cache), wheelhouse(cache)
    repo = tmp_path / "source"
    good = source_repo(repo)
    bad = commit_change(
        repo,
        "broken",
        "src/master_controller/web/app.py",
        '\nraise SystemExit("this release cannot start")\n',
        "a release whose controller cannot start",
    )
    figures: dict[str, float] = {}
    options = [
        f"--bind-ro={wheels}:/wheels",
        f"--bind-ro={repo}:/source",
        f"--bind-ro={(REPO_ROOT / 'node_modules').resolve()}:/node_modules",
        f"--overlay={integration_settings.images_dir}::/var/lib/master-controller/images",
    ]
    with booted(rootfs, "mc-systemd-test", options, tmp_path / "console.log") as box:
        started = time.monotonic()
        box.run(
            # an operator's checkout, as scripts/setup.sh leaves it
            "git clone -q /source /root/mc && cp -a /node_modules /root/mc/ && "
            "python3 -m venv /root/mc/.venv && "
            "/root/mc/.venv/bin/pip install -q --no-index --find-links /wheels -e /root/mc"
        )
        figures["bootstrap venv"] = _seconds(started)

        # install: a dry run changes nothing; the first run writes; the second has nothing to do
        dry = box.run("/root/mc/.venv/bin/master-controller install --dry-run")
        assert "would create /etc/systemd/system/master-controller.service" in dry
        assert box.status("test -e /etc/systemd/system/master-controller.service")[0] == 1
        box.run("/root/mc/.venv/bin/master-controller install")
        assert "nothing to change" in box.run("/root/mc/.venv/bin/master-controller install")
        assert box.run("systemctl is-enabled master-controller").strip() == "enabled"
        assert box.run("stat -c %a /etc/master-controller/config.toml").strip() == "600"
        box.run("echo 'boot_timeout = 20.0' >> /etc/master-controller/config.toml")

        # the first release
        started = time.monotonic()
        box.run(
            "/root/mc/.venv/bin/master-controller deploy main --repo /source "
            "--wheels /wheels --gate liveness",
            timeout=900,
        )
        figures["deploy (first release, cold venv)"] = _seconds(started)
        assert box.run("systemctl is-active master-controller").strip() == "active"
        assert box.run("readlink /opt/master-controller/current").strip() == f"releases/{good}"
        pid = box.run("systemctl show -p MainPID --value master-controller").strip()
        assert (
            box.run(f"readlink /proc/{pid}/cwd").strip()
            == f"/opt/master-controller/releases/{good}"
        )

        # a restart ends the controller only: what runs in its delegated cgroup stays
        guest = box.run(STAND_IN).strip()
        timing = box.run(f"systemctl restart master-controller && {HEALTH_WAIT}")
        figures["restart to healthy"] = float(re.findall(r"healthy after ([\d.]+)", timing)[0])
        assert box.status(f"kill -0 {guest}")[0] == 0, "the restart killed the stand-in guest"
        assert "mc-guests/stand-in" in box.run(f"cat /proc/{guest}/cgroup")
        assert box.run("systemctl is-active master-controller").strip() == "active"

        # a release that fails its health gate is rolled back by itself
        started = time.monotonic()
        code, output = box.status(
            f"{CLI} deploy {bad} --wheels /wheels --gate liveness", timeout=900
        )
        figures["deploy (failing release, then rollback)"] = _seconds(started)
        assert code == 1, output
        assert f"release {bad[:12]} failed" in output and f"rolled back to {good}" in output
        assert box.run("readlink /opt/master-controller/current").strip() == f"releases/{good}"
        assert box.run("systemctl is-active master-controller").strip() == "active"
        pid = box.run("systemctl show -p MainPID --value master-controller").strip()
        assert (
            box.run(f"readlink /proc/{pid}/cwd").strip()
            == f"/opt/master-controller/releases/{good}"
        )
        assert box.status(f"kill -0 {guest}")[0] == 0, "the rollback killed the stand-in guest"
        box.run(HEALTH_WAIT, timeout=30)

        # a third release, then `deploy rollback` goes back one
        fixed = commit_change(repo, "main", "README.md", "\n", "a release that starts")
        started = time.monotonic()
        box.run(f"{CLI} deploy {fixed} --wheels /wheels --gate liveness", timeout=900)
        figures["deploy (another release, warm pip)"] = _seconds(started)
        listed = box.run(f"{CLI} deploy list")
        assert f"* {fixed}" in listed and f"  {good}" in listed and f"  {bad}" in listed
        box.run(f"{CLI} deploy rollback --gate liveness", timeout=300)
        assert box.run("readlink /opt/master-controller/current").strip() == f"releases/{good}"
        assert box.status(f"kill -0 {guest}")[0] == 0
        history = json.loads(box.run("cat /opt/master-controller/history.json"))
        assert [(h["commit"], h["event"]) for h in history] == [
            (good, "deploy"),
            (fixed, "deploy"),
            (good, "rollback"),
        ]
        box.run(f"kill {guest}")

        # why the unit has no ProtectSystem=/PrivateTmp=/ReadWritePaths=: a mount a service
        # makes under them (as the controller mounts guests' disks) never reaches the host
        box.run("mkdir -p /run/mounts-test/m")
        box.run(
            "systemd-run --quiet --wait -p ProtectSystem=strict -p PrivateTmp=yes "
            "-p ReadWritePaths=/run/mounts-test mount -t tmpfs mc-test /run/mounts-test/m"
        )
        assert box.status("findmnt /run/mounts-test/m")[0] == 1, "the mount reached the host"
        box.run("systemd-run --quiet --wait mount -t tmpfs mc-test /run/mounts-test/m")
        assert box.status("findmnt /run/mounts-test/m")[0] == 0  # without them, it does
    print(json.dumps(figures, indent=2))
    shutil.rmtree(tmp_path / "source", ignore_errors=True)
