"""Who can read the controller's files. Attacked as an unprivileged local user (uid 65534)
on the host: the database, the lease file, guests' configuration, state, consoles and disk
layers, the signing and vault keys are out of reach while the controller runs. The
controller runs with umask 077 in a 0700 data dir, narrows what an older version left wider,
and keeps files private whatever the umask of whoever made them; image builds do not take
the controller's umask into the image."""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from datetime import timedelta
from ipaddress import IPv4Network
from pathlib import Path

import pytest

from master_controller.errors import ConfigError
from master_controller.images.builder import ImageBuilder
from master_controller.images.recipe import Recipe
from master_controller.images.store import ImageStore
from master_controller.network.ipam import AddressAllocator
from master_controller.settings import Settings
from master_controller.store import repo
from master_controller.store.database import Database
from master_controller.store.models import utcnow
from master_controller.web.app import protect_data_dir
from tests.conftest import require_root, require_tools
from tests.servers import controller
from tests.web.inprocess import NoGuestRuntime, serving, umask_of_process

NOBODY = "65534"
# a guest's own file systems inside its folder: their modes are the guest's business
GUEST_LAYERS = {"layer", "rootfs", "lower", "upper", "work"}


@pytest.fixture
def umask_022() -> Iterator[None]:
    """The common default umask for the test, whatever pytest runs with; put back after."""
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def _exposed(root: Path, skip: frozenset[str] = frozenset()) -> list[str]:
    """Everything under ``root`` that a group or other user could read, write or enter
    (not following symlinks; not into guests' own file systems, nor what ``skip`` names
    relative to ``root``)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        in_guest = here.parent.name == "guests"
        dirnames[:] = [
            d
            for d in dirnames
            if str((here / d).relative_to(root)) not in skip
            and not (in_guest and d in GUEST_LAYERS)
        ]
        names = [f for f in filenames if str((here / f).relative_to(root)) not in skip]
        for name in [".", *dirnames, *names]:
            path = here / name
            if not path.is_symlink() and _mode(path) & 0o077:
                found.append(f"{path} {_mode(path):o}")
    return found


def _read_as_nobody(path: Path) -> tuple[int, str]:
    """Exit status and error output of ``cat path`` as uid/gid 65534 without groups."""
    done = subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "cat", path],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        timeout=30,
    )
    return done.returncode, done.stderr.decode(errors="replace")


async def test_the_controller_runs_with_umask_077_and_narrows_what_it_finds(
    tmp_path: Path, umask_022: None
) -> None:
    """A data dir as an older version left it (world-readable folders, leases, guest state
    and console), a controller started on it: everything it holds is private, files it
    makes are born private (database with -wal/-shm, keys), guests' own file systems keep
    their modes, and the umask is back to what it was once the app stops."""
    data = tmp_path / "data"
    guest = data / "guests" / "g1"
    (guest / "upper").mkdir(parents=True)
    (data / "network").mkdir()
    for path in (data, data / "guests", guest, data / "network", guest / "upper"):
        path.chmod(0o755)
    for path in (data / "network/leases.json", guest / "state.json", guest / "console.log"):
        path.write_text("{}")
        path.chmod(0o644)
    (data / "kvm-probe.json").write_text("{}")
    settings = Settings(data_dir=data, egress_port=0)  # database and keys: the defaults
    async with serving(settings, NoGuestRuntime(settings)):
        assert umask_of_process() == 0o077
        made = [data / n for n in ("master-controller.db", "vault.keys", "secret.key")]
        assert all(p.is_file() for p in made)
        assert (data / "master-controller.db-wal").is_file()
        assert _mode(data) == 0o700
        assert _exposed(data) == []
        assert _mode(guest / "upper") == 0o755  # a guest's root: left as the guest needs it
    assert umask_of_process() == 0o022


def test_sqlite_and_lease_files_are_private_whatever_the_umask(
    tmp_path: Path, umask_022: None
) -> None:
    """The CLI, tests and the allocator make these files under any umask: still 0600."""

    async def use_database(url: str) -> None:
        database = Database(url)
        await asyncio.to_thread(database.migrate)
        async with database.session() as db:
            assert await repo.redeem_ticket(db, "x" * 22, utcnow() + timedelta(minutes=1))
        await database.close()

    folder = tmp_path / "db"
    asyncio.run(use_database(f"sqlite:///{folder / 'mc.db'}"))
    assert _mode(folder) == 0o700 and _mode(folder / "mc.db") == 0o600
    # a database an older version left 0644 is narrowed, with its -wal
    (folder / "mc.db").chmod(0o644)
    (folder / "mc.db-wal").touch()
    (folder / "mc.db-wal").chmod(0o644)
    Database(f"sqlite:///{folder / 'mc.db'}")
    assert _mode(folder / "mc.db") == 0o600 and _mode(folder / "mc.db-wal") == 0o600

    allocator = AddressAllocator(IPv4Network("10.99.0.0/24"), tmp_path / "network/leases.json")
    allocator.allocate("g1")
    allocator.allocate("g2")
    allocator.release("g1")
    network = tmp_path / "network"
    assert _mode(network) == 0o700
    assert {p.name: _mode(p) for p in network.iterdir()} == {
        "leases.json": 0o600,
        "leases.lock": 0o600,
    }


def test_a_shared_folder_is_never_taken_for_a_data_dir(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # like /tmp
    with pytest.raises(ConfigError, match="shared folder"):
        protect_data_dir(shared)
    assert _mode(shared) == 0o1777


# --- a real controller with a real guest, and a real unprivileged user ---------------------


@pytest.fixture
def open_folders(golden_image: str, integration_settings: Settings) -> Iterator[tuple[Path, Path]]:
    """A data dir of this test's own, 0755 as older versions made it, sharing the golden
    image store (a symlink); and a world-traversable folder for the database and signing
    key, so that only their own modes protect them."""
    require_tools("setpriv")
    data = Path(tempfile.mkdtemp(prefix="mc-perm-data-"))
    work = Path(tempfile.mkdtemp(prefix="mc-perm-work-"))
    try:
        for folder in (data, work):
            folder.chmod(0o755)
        (data / "images").symlink_to(integration_settings.images_dir)
        yield data, work
    finally:
        _remove(data)
        _remove(work)


def _remove(folder: Path) -> None:
    """Remove ``folder``, never through a mount point: a guest mount left behind there (an
    ID-mapped view of the shared image, say) is unmounted first, and reported."""
    inside = [
        line.split()[1]
        for line in Path("/proc/self/mounts").read_text().splitlines()
        if line.split()[1].startswith(f"{folder}/")
    ]
    for mount in sorted(inside, key=len, reverse=True):
        subprocess.run(["umount", "--lazy", mount], check=True, timeout=30)
    shutil.rmtree(folder, ignore_errors=True)
    assert not inside, f"mounts left behind: {inside}"


@pytest.mark.integration
def test_a_local_user_reads_nothing_of_a_running_controller(
    open_folders: tuple[Path, Path],
) -> None:
    require_root()
    data, work = open_folders
    control = work / "readable"
    control.write_text("anyone may read this\n")
    control.chmod(0o644)
    with controller(
        data, f"sqlite:///{work / 'mc.db'}", work, guest_network="10.213.248.0/22"
    ) as ctl:
        sid = ctl.ready_session("perm")
        guest = data / "guests" / sid
        upper = guest / "layer" / "upper"
        # what the guest itself left readable to everyone inside it (its Chromium profile,
        # its logs): on the host, only its 0700 folder keeps these private
        guest_files = [
            p for p in upper.rglob("*") if p.is_file() and not p.is_symlink() and _mode(p) & 0o004
        ]
        assert guest_files, "the guest wrote no world-readable file: nothing to attack"

        # the attack: uid 65534 reads each secret (it can read a readable file: a control)
        assert _read_as_nobody(control)[0] == 0
        private = [
            work / "mc.db",
            work / "mc.db-wal",
            work / "secret.key",
            data / "vault.keys",
            data / "network" / "leases.json",
            guest / "state.json",
            guest / "console.log",
            guest / "config" / "guest.json",
            guest / "disk.ext4",
            guest_files[0],
        ]
        assert [p for p in private if not p.exists()] == []
        attempts = {p: _read_as_nobody(p) for p in private}
        read = [str(p) for p, (status, _) in attempts.items() if status == 0]
        assert read == [], f"uid {NOBODY} read {read}"
        assert all("Permission denied" in said for _, said in attempts.values())

        # and why: a 0700 data dir, nothing in it open to group or others, private files
        assert _mode(data) == 0o700
        assert _exposed(data, skip=frozenset({"images"})) == []
        made = {p.name: _mode(p) for p in work.glob("*") if p.name.startswith(("mc.db", "secret"))}
        assert made == dict.fromkeys(["mc.db", "mc.db-wal", "mc.db-shm", "secret.key"], 0o600)
        listing = subprocess.run(
            ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "ls", data],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert listing.returncode != 0 and "Permission denied" in listing.stderr
        ctl.request("POST", f"/api/auth/session/{sid}/cancel")


@pytest.mark.integration
def test_an_image_built_under_umask_077_has_the_modes_it_means(
    golden_image: str, integration_settings: Settings, tmp_path: Path, repo_root: Path
) -> None:
    """The controller's umask stays out of images: folders the configuration layer makes
    (by Python and by commands in the image's chroot) are 0755, files keep their modes."""
    (tmp_path / "marker").write_text("made under umask 077\n")
    (tmp_path / "mc-umask.service").write_text(
        "[Unit]\nDescription=umask test\n[Service]\nExecStart=/bin/true\n"
        "[Install]\nWantedBy=mc-umask.target\n"
    )
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(
        f'extends = "{repo_root / "images/browser/recipe.toml"}"\n'
        'name = "browser-umask-077"\n'
        '[[files]]\ndest = "/opt/mc-umask/sub/marker"\nsource = "marker"\nmode = 0o640\n'
        '[[units]]\nname = "mc-umask.service"\nsource = "mc-umask.service"\n'
    )
    store = ImageStore(integration_settings.images_dir)
    previous = os.umask(0o077)
    try:
        result = ImageBuilder(integration_settings).build(Recipe.load(recipe))
        assert umask_of_process() == 0o077  # the caller's umask is back
    finally:
        os.umask(previous)
    try:
        root = store.get(result.image_id).rootfs
        assert _mode(root / "opt/mc-umask") == 0o755
        assert _mode(root / "opt/mc-umask/sub") == 0o755
        assert _mode(root / "opt/mc-umask/sub/marker") == 0o640
        assert _mode(root / "usr/lib/mc/mc_agent") == 0o755
        wants = root / "etc/systemd/system/mc-umask.target.wants"  # made by systemctl enable
        assert _mode(wants) == 0o755 and (wants / "mc-umask.service").is_symlink()
    finally:
        with store.locked():
            shutil.rmtree(integration_settings.images_dir / result.image_id)
