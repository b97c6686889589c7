"""The helper that starts a VMM unprivileged with its files already open: it runs a real
program as a real unprivileged UID here (root needed), and refuses what would leave the
VMM root or half-equipped."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from master_controller.runtimes.vmm_exec import FIRST_FD, LaunchError, VmmLaunch, parse
from master_controller.runtimes.vmm_user import PROBE_UID
from tests.conftest import require_root

SCRIPT = """
set -u
echo "ids $(id -u) $(id -g) [$(id -G)]"
grep -E '^(Cap(Prm|Eff|Amb)|NoNewPrivs):' /proc/self/status
echo "fds $(ls /proc/self/fd | sort -n | tr '\\n' ' ')"
echo "fd3 $(cat <&3)"
echo "fd4 $(cat <&4)"
echo written >&5
cat "$SECRET" 2>/dev/null && echo "by path: read" || echo "by path: denied"
"""


@pytest.fixture
def secret_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "guest"
    folder.mkdir(mode=0o700)
    for name, text in (("config.img", "agent-token"), ("kernel", "kernel bytes")):
        (folder / name).write_text(text)
        (folder / name).chmod(0o600)
    return folder


def test_the_vmm_gets_its_files_as_descriptors_and_nothing_else(secret_folder: Path) -> None:
    require_root()
    launch = VmmLaunch(uid=PROBE_UID, gid=PROBE_UID)
    assert launch.fd("read", secret_folder / "config.img") == FIRST_FD
    assert launch.fd("read", secret_folder / "kernel") == FIRST_FD + 1
    assert launch.fd("new", secret_folder / "console.log") == FIRST_FD + 2
    launch.fd("listen", secret_folder / "qmp.sock")
    leak = os.open(secret_folder / "kernel", os.O_RDONLY)  # inheritable, not handed over
    try:
        done = subprocess.run(
            launch.argv(["/bin/sh", "-c", SCRIPT]),
            env={"SECRET": str(secret_folder / "config.img"), "PATH": "/usr/bin:/bin"},
            capture_output=True,
            text=True,
            pass_fds=[leak],
            check=False,
        )
    finally:
        os.close(leak)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert f"ids {PROBE_UID} {PROBE_UID} [{PROBE_UID}]" in out  # no root, no other group
    for caps in ("CapPrm", "CapEff", "CapAmb"):
        assert f"{caps}:\t0000000000000000" in out
    assert "NoNewPrivs:\t1" in out
    # 0-2, the four handed over, and the one ls itself opens: nothing the parent leaked
    assert "fds 0 1 2 3 4 5 6 7 " in out
    assert "fd3 agent-token" in out and "fd4 kernel bytes" in out
    assert "by path: denied" in out  # the same file, by name, as the VMM's user
    assert (secret_folder / "console.log").read_text() == "written\n"
    for name in ("console.log", "qmp.sock"):
        assert (secret_folder / name).stat().st_mode & 0o777 == 0o600
        assert (secret_folder / name).stat().st_uid == 0


def test_a_missing_file_stops_the_launch_before_the_vmm_runs(tmp_path: Path) -> None:
    require_root()
    witness = tmp_path / "ran"
    launch = VmmLaunch(uid=PROBE_UID, gid=PROBE_UID)
    launch.fd("read", tmp_path / "no-such-disk")
    done = subprocess.run(
        launch.argv(["/usr/bin/touch", str(witness)]), capture_output=True, text=True, check=False
    )
    assert done.returncode == 1
    assert done.stderr.startswith(f"vmm_exec: read {tmp_path / 'no-such-disk'}: No such file")
    assert not witness.exists()


@pytest.mark.parametrize(
    "args",
    [
        ["--uid", "0", "--gid", "5", "--", "/bin/true"],
        ["--uid", "5", "--gid", "0", "--", "/bin/true"],
        ["--gid", "5", "--", "/bin/true"],
        ["--uid", "-1", "--gid", "5", "--", "/bin/true"],
        ["--uid", "5", "--gid", "5", "--open", "exec:/bin/sh", "--", "/bin/true"],
        ["--uid", "5", "--gid", "5", "--"],
    ],
)
def test_a_request_to_run_as_root_or_malformed_is_refused(args: list[str]) -> None:
    with pytest.raises(LaunchError):
        parse(args)


def test_the_refusal_is_said_and_nothing_runs(tmp_path: Path) -> None:
    witness = tmp_path / "ran"
    script = Path(sys.modules[VmmLaunch.__module__].__file__ or "")
    request = ["--uid", "0", "--gid", "0", "--", "/usr/bin/touch", str(witness)]
    done = subprocess.run(
        [sys.executable, "-I", "-S", str(script), *request],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 1 and done.stderr.startswith("vmm_exec: --uid and --gid")
    assert not witness.exists()
