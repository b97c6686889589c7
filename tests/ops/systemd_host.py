"""A throwaway Debian container with systemd as PID 1, for tests of the unit, install and
deploy under a real systemd (the host's PID 1 need not be systemd).

Its rootfs (mmdebstrap from the host's apt mirror) and a wheelhouse of the project's Python
dependencies are cached under the integration data dir; each boot runs on a volatile overlay
of the rootfs, in a cgroup of its own made the way the container runtime makes a guest's,
with a private network (loopback only).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from master_controller.images.apt_sources import host_entries, mirror_for
from master_controller.runtimes import cgroups
from master_controller.settings import REPO_ROOT

SUITE = "bookworm"
# the controller starts only where a runtime can run: QEMU (TCG) is the one a box can have
PACKAGES = (
    "systemd,systemd-sysv,dbus,python3,python3-venv,git,ca-certificates,iproute2,procps,"
    "util-linux,qemu-system-x86,qemu-utils,e2fsprogs,nftables"
)
MOUNT_POINTS = ("/var/lib/master-controller/images", "/wheels", "/source", "/node_modules")
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _key(*parts: str | bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part if isinstance(part, bytes) else part.encode())
    return digest.hexdigest()[:16]


def systemd_rootfs(cache: Path) -> Path:
    """A Debian rootfs with systemd, Python and git (cached by suite, packages, mirror)."""
    mirror = mirror_for(SUITE, host_entries())
    if mirror is None:
        raise RuntimeError(f"the host's apt sources name no mirror for {SUITE}")
    target = cache / f"systemd-host-{_key(SUITE, PACKAGES, mirror)}"
    if (target / "usr" / "lib" / "systemd" / "systemd").exists():
        _mount_points(target)
        return target
    staging = cache / f".systemd-host-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    subprocess.run(
        [
            "mmdebstrap",
            "--quiet",
            "--mode=root",
            "--variant=minbase",
            f"--include={PACKAGES}",
            "--aptopt=APT::Install-Recommends false",
            SUITE,
            str(staging),
            mirror,
        ],
        check=True,
        capture_output=True,
    )
    _mount_points(staging)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


def _mount_points(rootfs: Path) -> None:
    """Mount points the boxes use (a volatile root cannot make them in the shared rootfs)."""
    for point in MOUNT_POINTS:
        (rootfs / point.lstrip("/")).mkdir(parents=True, exist_ok=True)


def wheelhouse(cache: Path) -> Path:
    """Wheels of the project's dependencies and build backend (cached by pyproject.toml),
    so releases build their virtualenvs inside the container without a network."""
    pyproject = (REPO_ROOT / "pyproject.toml").read_bytes()
    project = tomllib.loads(pyproject.decode())
    wanted = [*project["project"]["dependencies"], *project["build-system"]["requires"]]
    target = cache / f"deploy-wheels-{_key(pyproject, sys.version)}"
    if (target / ".complete").exists():
        return target
    shutil.rmtree(target, ignore_errors=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(target), *wanted],
        check=True,
        capture_output=True,
    )
    (target / ".complete").touch()
    return target


def git(repo: Path, *args: str) -> str:
    env = {
        **os.environ,
        **{
            f"GIT_{w}_{k}": v
            for w in ("AUTHOR", "COMMITTER")
            for k, v in (("NAME", "t"), ("EMAIL", "t@t"))
        },
    }
    done = subprocess.run(
        ["git", "-C", str(repo), *args], check=True, capture_output=True, text=True, env=env
    )
    return done.stdout.strip()


def source_repo(target: Path) -> str:
    """A repository holding this tree's files as they are now (committed or not, ignored ones
    left out),
    on branch main; returns its commit."""
    target.mkdir(parents=True)
    git(target, "init", "-q", "-b", "main")
    listed = subprocess.run(
        [
            "git",
            "-C",
            str(REPO_ROOT),
            "ls-files",
            "-z",
            "--cached",
            "--others",
            "--exclude-standard",
        ],
        check=True,
        capture_output=True,
    ).stdout.split(b"\0")
    for name in filter(None, (n.decode() for n in listed)):
        source = REPO_ROOT / name
        if source.is_file() and not source.is_symlink():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    git(target, "add", "-A")
    git(target, "commit", "-q", "-m", "this tree")
    return git(target, "rev-parse", "HEAD")


def commit_change(repo: Path, branch: str, name: str, append: str, message: str) -> str:
    """Commit ``append`` added to file ``name`` on ``branch`` (made from main if new)."""
    exists = subprocess.run(["git", "-C", str(repo), "rev-parse", "--verify", "-q", branch])
    git(repo, "checkout", "-q", *(() if exists.returncode == 0 else ("-b",)), branch)
    with (repo / name).open("a") as out:
        out.write(append)
    git(repo, "commit", "-q", "-am", message)
    sha = git(repo, "rev-parse", "HEAD")
    git(repo, "checkout", "-q", "main")
    return sha


@dataclass
class Box:
    """A booted container: run shell scripts in it as root."""

    leader: int  # its PID 1, on the host

    def status(self, script: str, timeout: float = 600) -> tuple[int, str]:
        """Exit status and output (stdout, then stderr) of ``script`` run by sh -e inside."""
        argv = ["nsenter", "-t", str(self.leader), "-a", "/usr/bin/env", "-i", f"PATH={PATH}"]
        argv += ["HOME=/root", "LANG=C.UTF-8", "/bin/sh", "-ec", script]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        return done.returncode, done.stdout + done.stderr

    def run(self, script: str, timeout: float = 600) -> str:
        code, output = self.status(script, timeout)
        assert code == 0, f"{script}\nexited {code}:\n{output}"
        return output


def _leader(nspawn: subprocess.Popen[bytes], deadline: float, log: Path) -> int:
    while time.monotonic() < deadline and nspawn.poll() is None:
        for task in Path(f"/proc/{nspawn.pid}/task").iterdir():
            children = (task / "children").read_text().split()
            if children:
                return int(children[0])
        time.sleep(0.05)
    raise RuntimeError(f"systemd-nspawn started no container:\n{log.read_text()[-2000:]}")


def _wait_booted(box: Box, deadline: float) -> None:
    """Until its systemd finished starting up (before that, /tmp may still be wiped)."""
    state = ""
    while time.monotonic() < deadline:
        state = box.status("systemctl is-system-running --wait")[1].strip()
        if state in ("running", "degraded"):
            return
        time.sleep(0.1)
    raise RuntimeError(f"the box did not finish booting: {state}")


@contextmanager
def booted(rootfs: Path, name: str, options: list[str], log: Path) -> Iterator[Box]:
    """Boot ``rootfs`` (volatile: nothing it writes outlives the box) with systemd as PID 1
    in a cgroup2 hierarchy of its own; power it off and remove its cgroups after."""
    paths = cgroups.create(name, cgroups.Limits(4 << 30, 8192, 200_000))
    argv = cgroups.enter(
        paths,
        [
            "systemd-nspawn",
            "--quiet",
            "--boot",
            f"--directory={rootfs}",
            f"--machine={name}",
            "--register=no",
            "--keep-unit",
            "--private-network",
            "--volatile=overlay",
            "--console=read-only",
            "--link-journal=no",
            *options,
        ],
    )
    env = {**os.environ, "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1"}
    with log.open("w") as out:
        nspawn = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        box = Box(_leader(nspawn, time.monotonic() + 30, log))
        _wait_booted(box, time.monotonic() + 120)
        yield box
    finally:
        nspawn.terminate()  # an orderly poweroff of the container
        try:
            nspawn.wait(60)
        except subprocess.TimeoutExpired:
            nspawn.kill()
            nspawn.wait()
        cgroups.remove(paths)
