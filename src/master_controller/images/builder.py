"""Building images: recipe -> base layer (+ tools layer) -> configuration layer -> image in
the store.

Three layers, each keyed by the digest of its inputs:

- the base layer, a Debian rootfs made by mmdebstrap from the recipe's suite and packages
  (minutes, cold); cached under ``<data_dir>/cache/layers/base-<key>``;
- the tools layer, when the recipe names a ``tools`` folder: its npm packages (the CLIs
  people sign in to) installed from its lock file, cached by the lock file's digest under
  ``<data_dir>/cache/layers/tools-<key>``;
- the configuration layer: units, files, the tools and the guest agent on top of a
  hard-linked copy of the base (seconds; made for each build, never cached).

The image id is derived from the content: the base rootfs's tree digest, the configuration
layer's file digests and the kernel and initrd digests. Everything is made in a staging folder
and enters the store by one rename, so a failed or interrupted build leaves nothing there.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import IO, Any

from master_controller.commands import run
from master_controller.digests import file_digest, json_digest, tree_digest
from master_controller.diskspace import REMEDY, full_reason, is_full_error, require_free
from master_controller.errors import BuildError, CommandError, MCError
from master_controller.images.apt_sources import build_sources
from master_controller.images.kernel import extract_vmlinux
from master_controller.images.recipe import Recipe, agent_files
from master_controller.images.store import MANIFEST, ImageStore, write_json_atomic
from master_controller.images.units import exec_start, is_enabled, parse_unit
from master_controller.settings import Settings
from master_controller.steps import StepLog

# Bump when what the builder makes of the same inputs changes: the layer's cache key (base)
# or the image id (builder) changes with it.
BASE_LAYER_VERSION = 1
BUILDER_VERSION = 3  # 3: vmlinux for Firecracker
TOOLS_LAYER_VERSION = 1
TOOLS_DEST = "/opt/mc-tools"
EXT4_JOURNAL = 64 * 2**20  # mkfs.ext4 journal for disks of 1-128 GiB
AGENT_DEST = "/usr/lib/mc/mc_agent"
BUILD_UMASK = 0o022
_USER = re.compile(r"^[a-z_][a-z0-9_-]{0,30}$")


@dataclass(frozen=True)
class BuildResult:
    image_id: str
    path: Path
    seconds: float
    base_cached: bool
    already_built: bool
    steps: list[dict[str, Any]]


class ImageBuilder:
    def __init__(self, settings: Settings, steps: StepLog | None = None) -> None:
        self.settings = settings
        self.steps = steps or StepLog()
        self.store = ImageStore(settings.images_dir)
        self.layers_dir = settings.cache_dir / "layers"
        self.tmp_dir = settings.cache_dir / "tmp"

    def build(self, recipe: Recipe, refresh_base: bool = False) -> BuildResult:
        """Build ``recipe`` into the store (or find the identical image already there).

        Runs under umask 022 whatever the caller's (the controller's is 077): what mmdebstrap,
        dpkg, npm and the configuration layer create gets the modes the image means it to
        have, and since the base layer's digest covers modes, the image id does not depend
        on who built it. The umask is per process: don't build while other threads of the
        same process create files that must stay private."""
        started = time.monotonic()
        with _umask(BUILD_UMASK), self._build_lock():
            self._clear_staging()
            staging = Path(tempfile.mkdtemp(prefix="image-", dir=self.tmp_dir))
            try:
                with (staging / "build.log").open("w") as log:
                    return self._build(recipe, staging, log, refresh_base, started)
            except (MCError, OSError) as exc:
                if is_full_error(exc):
                    self._clear_staging()
                    step = self.steps.records[-1].name if self.steps.records else "start"
                    raise BuildError(
                        full_reason(self.tmp_dir, f"building the image (step {step!r})")
                        + f"; its partial files were removed; {REMEDY}"
                    ) from exc
                if isinstance(exc, OSError):
                    raise BuildError(f"image build failed: {exc}") from exc
                raise
            finally:
                # The image was moved into the store on success; anything still in tmp
                # (staging, unfinished layers) is discarded.
                self._clear_staging()

    def _build(
        self, recipe: Recipe, staging: Path, log: IO[str], refresh_base: bool, started: float
    ) -> BuildResult:
        with self.steps.step("base layer") as rec:
            base, base_cached = self._base_layer(recipe, log, refresh_base)
            rec.detail = "cached" if base_cached else "built"
        with self.steps.step("configuration layer"):
            rootfs = staging / "rootfs"
            run(["cp", "-al", base / "rootfs", rootfs], log=log)
            config_digest = self._configure(recipe, rootfs, log)
        with self.steps.step("kernel"):
            boot = self._copy_kernel(rootfs, staging)
        base_info = _read_json(base / "layer.json")
        image_id = json_digest(
            {
                "builder": BUILDER_VERSION,
                "base": base_info["tree"]["sha256"],
                "config": config_digest,
                "kernel": boot["kernel"]["sha256"],
                "initrd": boot["initrd"]["sha256"],
            }
        )[:16]
        if (self.settings.images_dir / image_id / MANIFEST).is_file():
            self.steps.records[-1].detail = f"image {image_id} is already in the store"
            return self._result(image_id, started, base_cached, already=True)
        with self.steps.step("ext4 disk"):
            disk = self._make_disk(recipe, rootfs, staging / "disk.ext4", base_info, log)
        with self.steps.step("manifest"):
            manifest = self._manifest(recipe, image_id, rootfs, base_info, boot, disk)
            manifest["build"] = {
                "seconds": round(time.monotonic() - started, 1),
                "base_cached": base_cached,
                "steps": [r.as_dict() for r in self.steps.records],
            }
            write_json_atomic(staging / MANIFEST, manifest)
        log.flush()
        with self.steps.step("store"):
            self.settings.images_dir.mkdir(parents=True, exist_ok=True)
            self.store.add(image_id, staging)
        return self._result(image_id, started, base_cached, already=False)

    def _result(self, image_id: str, started: float, cached: bool, already: bool) -> BuildResult:
        return BuildResult(
            image_id=image_id,
            path=self.settings.images_dir / image_id,
            seconds=time.monotonic() - started,
            base_cached=cached,
            already_built=already,
            steps=[r.as_dict() for r in self.steps.records],
        )

    # --- locking and staging ----------------------------------------------------------------

    @contextmanager
    def _build_lock(self) -> Iterator[None]:
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self.layers_dir.mkdir(parents=True, exist_ok=True)
        with (self.settings.cache_dir / ".build.lock").open("w") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                # one build at a time per data dir; the next one reuses what it cached
                with self.steps.step("wait for the build already running"):
                    fcntl.flock(fh, fcntl.LOCK_EX)
            yield

    def _clear_staging(self) -> None:
        """Under the build lock nothing in tmp is live: it is what interrupted builds left."""
        for leftover in self.tmp_dir.iterdir():
            shutil.rmtree(leftover, ignore_errors=True)

    # --- base layer -----------------------------------------------------------------------

    def _base_layer(self, recipe: Recipe, log: IO[str], refresh: bool) -> tuple[Path, bool]:
        key = json_digest({"builder": BASE_LAYER_VERSION, **recipe.base_inputs()})[:24]
        layer = self.layers_dir / f"base-{key}"
        if (layer / "layer.json").is_file() and not refresh:
            log.write(f"base layer {key}: cached at {layer}\n")
            return layer, True
        work = Path(tempfile.mkdtemp(prefix="base-", dir=self.tmp_dir))
        started = time.monotonic()
        rootfs = work / "rootfs"
        sources = build_sources(
            recipe.suite, self.settings.debian_mirror, self.settings.debian_security_mirror
        )
        include = ",".join([*recipe.packages, recipe.kernel_package])
        with (work / "build.log").open("w") as base_log:
            argv = [
                "mmdebstrap",
                "--mode=root",
                f"--variant={recipe.variant}",
                f"--architectures={recipe.architecture}",
                f"--include={include}",
                "--aptopt=APT::Install-Recommends false",
                "--dpkgopt=path-exclude=/usr/share/doc/*",
                "--dpkgopt=path-exclude=/usr/share/man/*",
                "--dpkgopt=path-exclude=/usr/share/locale/*",
                "--dpkgopt=path-include=/usr/share/locale/en*",
                recipe.suite,
                str(rootfs),
                *sources,
            ]
            try:
                run(argv, log=base_log, timeout=3600)
                for user in recipe.users:
                    if not _USER.match(user):
                        raise BuildError(f"invalid user name in recipe: {user!r}")
                    run(
                        [
                            "chroot",
                            rootfs,
                            "useradd",
                            "--create-home",
                            "--shell",
                            "/bin/bash",
                            "--user-group",
                            user,
                        ],
                        log=base_log,
                    )
            except CommandError as exc:
                raise BuildError(f"base layer: {exc.reason}") from exc
        tree = tree_digest(rootfs)
        write_json_atomic(
            work / "layer.json",
            {
                "key": key,
                "inputs": recipe.base_inputs(),
                "sources": sources,
                "tree": {"sha256": tree.sha256, "files": tree.files, "bytes": tree.bytes},
                "packages": installed_packages(rootfs),
                "seconds": round(time.monotonic() - started, 1),
                "created": _now(),
            },
        )
        log.write((work / "build.log").read_text())
        if layer.exists():
            shutil.rmtree(layer)
        work.rename(layer)
        return layer, False

    # --- tools layer (npm) ---------------------------------------------------------------------

    def _tools_layer(self, recipe: Recipe, log: IO[str]) -> Path:
        """The recipe's npm packages installed from its lock file (``npm ci``), cached by
        the lock file's digest. Install scripts do not run: what the packages ship is what
        the image gets."""
        assert recipe.tools is not None
        key = tools_key(recipe)
        layer = self.layers_dir / f"tools-{key}"
        if (layer / "layer.json").is_file():
            log.write(f"tools layer {key}: cached at {layer}\n")
            return layer
        if shutil.which("npm") is None:
            raise BuildError("the recipe installs npm packages but npm is not installed")
        work = Path(tempfile.mkdtemp(prefix="tools-", dir=self.tmp_dir))
        tree = work / "tree"
        tree.mkdir()
        for name in ("package.json", "package-lock.json"):
            shutil.copyfile(recipe.tools / name, tree / name)
        started = time.monotonic()
        try:
            run(
                ["npm", "ci", "--no-audit", "--no-fund", "--ignore-scripts", "--omit=dev"],
                log=log,
                timeout=1800,
                cwd=tree,
            )
            # install scripts run only for the packages the tools folder names
            trusted = json.loads((tree / "package.json").read_text()).get("mcInstallScripts", [])
            if trusted:
                run(
                    ["npm", "rebuild", "--ignore-scripts=false", "--foreground-scripts", *trusted],
                    log=log,
                    timeout=600,
                    cwd=tree,
                )
        except CommandError as exc:  # build() clears the unfinished work folder
            raise BuildError(f"tools layer: {exc.reason}") from exc
        bins = sorted(p.name for p in (tree / "node_modules" / ".bin").iterdir())
        size = sum((Path(d) / f).lstat().st_size for d, _, names in os.walk(tree) for f in names)
        write_json_atomic(
            work / "layer.json",
            {
                "key": key,
                "bins": bins,
                "bytes": size,
                "seconds": round(time.monotonic() - started, 1),
                "created": _now(),
            },
        )
        if layer.exists():
            shutil.rmtree(layer)
        work.rename(layer)
        return layer

    # --- configuration layer ----------------------------------------------------------------

    def _configure(self, recipe: Recipe, rootfs: Path, log: IO[str]) -> str:
        """Write the recipe's files, units and agent; enable units. Returns the layer digest.

        The rootfs is a hard-linked copy of the cached base: files are only ever replaced
        (unlink, then write), never written in place, so the cache stays as it was."""
        for spec in recipe.files:
            replace_file(rootfs, spec.dest, spec.source.read_bytes(), spec.mode)
        for unit in recipe.units:
            replace_file(rootfs, f"/etc/systemd/system/{unit.name}", unit.source.read_bytes())
        for path in agent_files(recipe.agent):
            rel = path.relative_to(recipe.agent).as_posix()
            replace_file(rootfs, f"{AGENT_DEST}/{rel}", path.read_bytes())
        if recipe.tools is not None:
            tools = self._tools_layer(recipe, log)
            dest = path_in_root(rootfs, TOOLS_DEST)
            dest.parent.mkdir(parents=True, exist_ok=True)
            run(["cp", "-al", tools / "tree", dest], log=log)
        enabled = [u.name for u in recipe.units if u.enable]
        if enabled:
            run(["chroot", rootfs, "systemctl", "enable", *enabled], log=log)
        return json_digest(recipe.config_inputs())

    def _copy_kernel(self, rootfs: Path, staging: Path) -> dict[str, dict[str, str]]:
        kernels = sorted((rootfs / "boot").glob("vmlinuz-*"))
        if not kernels:
            raise BuildError("the base layer has no kernel in /boot (kernel_package missing?)")
        version = kernels[-1].name.removeprefix("vmlinuz-")
        initrd = rootfs / "boot" / f"initrd.img-{version}"
        if not initrd.is_file():
            raise BuildError(f"the base layer has no initrd for kernel {version}")
        result = {}
        for name, source in (("kernel", kernels[-1]), ("initrd", initrd)):
            dest = staging / ("vmlinuz" if name == "kernel" else "initrd.img")
            shutil.copyfile(source, dest)
            result[name] = {"file": dest.name, "version": version, "sha256": file_digest(dest)}
        # Firecracker boots only an uncompressed ELF kernel
        compression = extract_vmlinux(staging / "vmlinuz", staging / "vmlinux")
        result["vmlinux"] = {
            "file": "vmlinux",
            "version": version,
            "sha256": file_digest(staging / "vmlinux"),
            "from": compression,
        }
        return result

    def _make_disk(
        self, recipe: Recipe, rootfs: Path, disk: Path, base: dict[str, Any], log: IO[str]
    ) -> dict[str, int]:
        content = int(base["tree"]["bytes"])
        if recipe.tools is not None:
            # the configuration layer made (or found) the tools layer already
            tools_layer = self.layers_dir / f"tools-{tools_key(recipe)}"
            content += int(_read_json(tools_layer / "layer.json")["bytes"])
        size_mib = int(content * 1.25 / 2**20) + recipe.disk_headroom_mib
        # the disk is sparse: it takes about its content (plus the journal) on the host
        require_free(disk.parent, content + EXT4_JOURNAL, "writing the image's ext4 disk")
        with disk.open("wb") as fh:
            fh.truncate(size_mib * 2**20)
        try:
            run(
                [
                    "mkfs.ext4",
                    "-q",
                    "-F",
                    "-L",
                    "mcroot",
                    "-E",
                    "lazy_itable_init=1",
                    "-d",
                    rootfs,
                    disk,
                ],
                log=log,
                timeout=1800,
            )
        except CommandError as exc:
            raise BuildError(f"ext4 disk: {exc.reason}") from exc
        st = disk.stat()
        return {"disk": st.st_size, "disk_allocated": st.st_blocks * 512}

    def _manifest(
        self,
        recipe: Recipe,
        image_id: str,
        rootfs: Path,
        base: dict[str, Any],
        boot: dict[str, dict[str, str]],
        disk: dict[str, int],
    ) -> dict[str, Any]:
        units = []
        for unit in recipe.units:
            installed = rootfs / "etc/systemd/system" / unit.name
            units.append(
                {
                    "name": unit.name,
                    "enabled": is_enabled(rootfs, unit.name),
                    "sha256": file_digest(installed),
                    "exec_start": exec_start(parse_unit(installed.read_text())),
                }
            )
        agent = {
            p.relative_to(recipe.agent).as_posix(): file_digest(p)
            for p in agent_files(recipe.agent)
        }
        return {
            "id": image_id,
            "name": recipe.name,
            "created": _now(),
            "builder_version": BUILDER_VERSION,
            "recipe": {
                "name": recipe.name,
                "path": str(recipe.path),
                "digest": recipe.digest(),
                "packages": list(recipe.packages),
                "units": [u.name for u in recipe.units],
            },
            "base_layer": {
                "key": base["key"],
                "tree_sha256": base["tree"]["sha256"],
                "files": base["tree"]["files"],
                "sources": base["sources"],
            },
            "config_layer": {"digest": json_digest(recipe.config_inputs())},
            "tools_layer": _tools_manifest(recipe, rootfs),
            "packages": installed_packages(rootfs),
            "units": units,
            "agent": {"path": AGENT_DEST, "sha256": json_digest(agent), "files": agent},
            "kernel": boot["kernel"],
            "initrd": boot["initrd"],
            "vmlinux": boot["vmlinux"],
            "sizes": {
                "rootfs": base["tree"]["bytes"],
                **disk,
                "kernel": (rootfs.parent / "vmlinuz").stat().st_size,
                "vmlinux": (rootfs.parent / "vmlinux").stat().st_size,
                "initrd": (rootfs.parent / "initrd.img").stat().st_size,
            },
        }


def tools_key(recipe: Recipe) -> str:
    """The tools layer's cache key: its builder version and the npm manifest and lock."""
    return json_digest({"version": TOOLS_LAYER_VERSION, "tools": recipe.tools_digest()})[:24]


def _tools_manifest(recipe: Recipe, rootfs: Path) -> dict[str, Any] | None:
    """The npm packages installed at TOOLS_DEST, with versions, from the lock file."""
    if recipe.tools is None:
        return None
    key = tools_key(recipe)
    lock = json.loads((recipe.tools / "package-lock.json").read_text())
    top = lock.get("packages", {}).get("", {}).get("dependencies", {})
    installed = {
        name: lock["packages"].get(f"node_modules/{name}", {}).get("version", "?")
        for name in sorted(top)
    }
    bin_dir = path_in_root(rootfs, TOOLS_DEST) / "node_modules" / ".bin"
    return {
        "key": key,
        "path": TOOLS_DEST,
        "packages": installed,
        "bins": sorted(p.name for p in bin_dir.iterdir()) if bin_dir.is_dir() else [],
    }


def prune_layers(settings: Settings) -> list[str]:
    """Remove cached base layers that no image in the store was built from."""
    store = ImageStore(settings.images_dir)
    used = {info.manifest.get("base_layer", {}).get("key") for info in store.images()}
    layers_dir = settings.cache_dir / "layers"
    removed = []
    with store.locked():
        used |= {info.manifest.get("tools_layer", {}).get("key") for info in store.images()}
        for layer in sorted(layers_dir.glob("*-*")) if layers_dir.is_dir() else []:
            if layer.name.split("-", 1)[1] not in used:
                shutil.rmtree(layer)
                removed.append(layer.name)
    return removed


def installed_packages(rootfs: Path) -> dict[str, str]:
    """Package -> version of everything installed in ``rootfs``."""
    out = run(
        [
            "dpkg-query",
            f"--admindir={rootfs / 'var/lib/dpkg'}",
            "-W",
            "-f=${Package}\t${Version}\t${db:Status-Status}\n",
        ]
    )
    packages = {}
    for line in out.splitlines():
        name, version, status = [*line.split("\t"), "", ""][:3]
        if status == "installed":
            packages[name] = version
    return packages


def path_in_root(root: Path, dest: str) -> Path:
    """``dest`` inside ``root`` with symlinks resolved as the guest would (chroot semantics),
    so a symlink in the rootfs can never lead a write outside it."""
    parts = list(PurePosixPath(dest).parts[1:])
    resolved = root
    hops = 0
    while parts:
        part = parts.pop(0)
        candidate = resolved / part
        if candidate.is_symlink() and parts:  # the last component itself is replaced
            hops += 1
            if hops > 40:
                raise BuildError(f"too many symlinks resolving {dest}")
            target = PurePosixPath(os.readlink(candidate))
            if target.is_absolute():
                resolved = root
                parts = list(target.parts[1:]) + parts
            else:
                parts = list(target.parts) + parts
        elif part == "..":
            resolved = resolved.parent if resolved != root else root
        else:
            resolved = candidate
    return resolved


def replace_file(root: Path, dest: str, content: bytes, mode: int = 0o644) -> None:
    """Write a new file at ``dest`` in ``root``: unlink first, so a hard link stays untouched."""
    path = path_in_root(root, dest)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink() or path.exists():
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(content)
    os.chmod(path, mode)


@contextmanager
def _umask(mask: int) -> Iterator[None]:
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def _read_json(path: Path) -> dict[str, Any]:
    return dict(json.loads(path.read_text()))


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
