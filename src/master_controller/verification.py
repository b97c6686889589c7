"""Verifying an image before it may be promoted: static checks, then boot checks.

Static checks read the image: its manifest against its recipe and the browser contract
(:mod:`.contract`), the unit files with their ExecStart and ordering, localhost resolution,
kernel, initrd and agent digests. Boot checks boot it in a runtime and look from outside the
guest: WebSocket 101 with the right accept value from its (socket-activated) websockify,
RFB 3.8 with the guest's password and a frame that is not blank on the path the relay takes
(TCP to its VNC server), a Chromium window on :1, the agent's health. Results, each with its
duration, go to ``verify.json`` next to the image; a failure names what is missing.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from master_controller.commands import run
from master_controller.digests import file_digest, json_digest
from master_controller.errors import CommandError, ProbeError, VerificationFailed
from master_controller.images.contract import (
    BROWSER_UNITS,
    REQUIRED_PACKAGES,
    UnitContract,
    hardening_problems,
)
from master_controller.images.store import ImageInfo, ImageStore
from master_controller.images.units import exec_start, is_enabled, parse_unit, unit_path
from master_controller.runtimes.base import GuestSecrets, GuestState, Runtime
from master_controller.settings import Settings
from master_controller.steps import StepLog, StepRecord
from master_controller.viewing.guest_socket import rfb_connect
from master_controller.viewing.readiness import (
    agent_health,
    guest_give_up,
    non_blank_frame,
    poll,
    websocket_upgrade,
)
from master_controller.viewing.rfb import SECURITY_NONE
from mc_agent import WEBSOCKIFY_PORT

SCREENSHOT = "screenshot.png"
T = TypeVar("T")


class Verifier:
    def __init__(
        self,
        settings: Settings,
        runtime: Runtime | None,
        steps: StepLog | None = None,
        more_runtimes: tuple[Runtime, ...] = (),
    ) -> None:
        """Boot checks run in ``runtime`` and then in each of ``more_runtimes`` (QEMU with
        ``--vm``); checks of the extra runtimes carry its name, e.g. "agent health (qemu)"."""
        self.settings = settings
        self.store = ImageStore(settings.images_dir)
        self.runtimes = ([runtime] if runtime else []) + list(more_runtimes)
        self.steps = steps or StepLog()

    async def verify(self, ref: str, boot: bool = True) -> dict[str, Any]:
        """Run the checks, write ``verify.json`` and return it. Raises nothing for a failed
        check: ``passed`` says the outcome and ``failures`` name what is wrong."""
        info = self.store.get(ref)
        started = time.monotonic()
        self.steps.records.clear()
        self._static(info)
        timings: dict[str, float] = {}
        if boot:
            if not self.runtimes:
                raise VerificationFailed("boot checks need a runtime")
            # An image that failed static checks cannot be promoted; its boot checks still
            # run, to show what a guest would do, but are not worth a full boot timeout.
            static_failed = any(not r.ok for r in self.steps.records)
            timeout = min(self.settings.boot_timeout, 30.0) if static_failed else None
            for index, runtime in enumerate(self.runtimes):
                suffix = "" if index == 0 else f" ({runtime.name})"
                await self._boot(
                    info, runtime, suffix, timings, timeout or self.settings.boot_timeout
                )
        records = self.steps.records
        failures = [f"{r.name}: {r.detail}" for r in records if not r.ok]
        result = {
            "image_id": info.id,
            "manifest_sha256": file_digest(info.path / "manifest.json"),
            "passed": not failures,
            "boot_checked": boot,
            "runtimes": [r.name for r in self.runtimes] if boot else [],
            "verified_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "seconds": round(time.monotonic() - started, 2),
            "checks": [r.as_dict() for r in records],
            "failures": failures,
            "timings": {k: round(v, 2) for k, v in timings.items()},
        }
        self.store.record_verification(info.id, result)
        return result

    def contract_failures(self, ref: str) -> list[str]:
        """The static checks of this code's contract against image ``ref``, without booting
        it and without writing its ``verify.json`` (a deploy asks whether the image it runs
        on meets the contract of the release it is about to start)."""
        info = self.store.get(ref)
        self.steps.records.clear()
        self._static(info)
        return [f"{r.name}: {r.detail}" for r in self.steps.records if not r.ok]

    def _check(self, name: str, fn: Callable[[StepRecord], None]) -> bool:
        try:
            with self.steps.step(name) as record:
                fn(record)
        except Exception:
            return False
        return True

    async def _acheck(self, name: str, fn: Callable[[StepRecord], Awaitable[None]]) -> bool:
        try:
            with self.steps.step(name) as record:
                await fn(record)
        except Exception:
            return False
        return True

    # --- static ---------------------------------------------------------------------------

    def _static(self, info: ImageInfo) -> None:
        manifest = info.manifest
        rootfs = info.rootfs

        def manifest_check(record: StepRecord) -> None:
            if manifest.get("id") != info.id:
                raise VerificationFailed(f"manifest id {manifest.get('id')} is not {info.id}")
            if not rootfs.is_dir():
                raise VerificationFailed("rootfs/ is missing")

        def packages_check(record: StepRecord) -> None:
            installed = manifest.get("packages", {})
            wanted = set(REQUIRED_PACKAGES) | set(manifest.get("recipe", {}).get("packages", []))
            missing = sorted(p for p in wanted if p not in installed)
            if missing:
                raise VerificationFailed(f"packages not installed: {', '.join(missing)}")
            record.detail = f"{len(installed)} packages"

        def boot_files_check(record: StepRecord) -> None:
            for key in ("kernel", "initrd"):
                entry = manifest.get(key, {})
                path = info.path / str(entry.get("file", ""))
                if not path.is_file() or file_digest(path) != entry.get("sha256"):
                    raise VerificationFailed(f"{key} {path.name} is missing or altered")
            if not info.disk.is_file():
                raise VerificationFailed("disk.ext4 is missing")

        def agent_check(record: StepRecord) -> None:
            agent = manifest.get("agent", {})
            base = rootfs / str(agent.get("path", "/usr/lib/mc/mc_agent")).lstrip("/")
            found = {}
            for rel in agent.get("files", {}):
                path = base / rel
                if not path.is_file():
                    raise VerificationFailed(f"agent file {rel} is missing")
                found[rel] = file_digest(path)
            if json_digest(found) != agent.get("sha256"):
                raise VerificationFailed("the agent in the rootfs differs from the manifest")

        def recipe_units_check(record: StepRecord) -> None:
            for unit in manifest.get("units", []):
                path = rootfs / "etc/systemd/system" / unit["name"]
                if not path.is_file():
                    raise VerificationFailed(f"{unit['name']} not installed")
                if file_digest(path) != unit["sha256"]:
                    raise VerificationFailed(f"{unit['name']} differs from the manifest")
                if unit["enabled"] and not is_enabled(rootfs, unit["name"]):
                    raise VerificationFailed(f"{unit['name']} is not enabled")
            record.detail = f"{len(manifest.get('units', []))} units as built"

        def localhost_check(record: StepRecord) -> None:
            try:
                out = run(["chroot", rootfs, "getent", "hosts", "localhost"], timeout=10)
            except CommandError as exc:
                raise VerificationFailed("localhost does not resolve (no /etc/hosts?)") from exc
            if "127.0.0.1" not in out and "::1" not in out:
                raise VerificationFailed(f"localhost resolves to {out.strip()!r}")
            record.detail = out.split()[0]

        def hardening_check(record: StepRecord) -> None:
            if problems := hardening_problems(rootfs):
                raise VerificationFailed("; ".join(problems))
            record.detail = "chromium policy, login terminal, window manager"

        self._check("manifest", manifest_check)
        self._check("packages", packages_check)
        self._check("recipe units", recipe_units_check)
        for contract in BROWSER_UNITS:
            self._check(f"unit {contract.name}", partial(_unit_check, rootfs, contract))
        self._check("localhost resolves", localhost_check)
        self._check("guest hardening", hardening_check)
        self._check("kernel, initrd and disk", boot_files_check)
        self._check("agent", agent_check)

    # --- boot -----------------------------------------------------------------------------

    async def _boot(
        self,
        info: ImageInfo,
        runtime: Runtime,
        suffix: str,
        timings: dict[str, float],
        timeout: float,
    ) -> None:
        guest_secrets = GuestSecrets(
            vnc_password=secrets.token_urlsafe(6)[:8], agent_token=secrets.token_urlsafe(24)
        )
        guest: GuestState | None = None

        async def boot(record: StepRecord) -> None:
            nonlocal guest
            guest_id = f"verify-{info.id[:8]}-{secrets.token_hex(3)}"
            guest = await runtime.create(guest_id, info.id, guest_secrets)
            await runtime.start(guest)
            record.detail = f"{runtime.name} guest at {guest.address}"

        try:
            if not await self._acheck(f"boot in {runtime.name}", boot) or guest is None:
                for name in BOOT_CHECKS:
                    self.steps.records.append(
                        StepRecord(name + suffix, ok=False, detail="skipped: no boot")
                    )
                return
            shot = info.path / (SCREENSHOT if not suffix else f"screenshot-{runtime.name}.png")
            checks = BootChecks(runtime, guest, timeout, shot, timings, prefix=runtime.name)
            for name in BOOT_CHECKS:
                await self._acheck(name + suffix, getattr(checks, BOOT_CHECKS[name]))
        finally:
            if guest is not None:
                with self.steps.step("clean up guest" + suffix):
                    await runtime.destroy(guest)


# check name -> BootChecks method, in the order they run
BOOT_CHECKS = {
    f"websocket 101 on {WEBSOCKIFY_PORT}": "websocket_101",
    "rfb 3.8 handshake with password": "rfb_handshake",
    "non-blank frame": "non_blank_frame",
    "chromium window on :1": "chromium_window",
    "agent health": "agent_health",
}


class BootChecks:
    """The checks of a booted guest, made from outside it, sharing one deadline."""

    def __init__(
        self,
        runtime: Runtime,
        guest: GuestState,
        timeout: float,
        screenshot: Path,
        timings: dict[str, float],
        prefix: str = "",
    ) -> None:
        self.runtime = runtime
        self.guest = guest
        self.endpoint = runtime.endpoint(guest)
        self.password = guest.secrets.vnc_password
        self.token = guest.secrets.agent_token
        self.started = time.monotonic()
        self.deadline = self.started + timeout
        self.screenshot = screenshot
        self.timings = timings
        self.prefix = f"{prefix} " if prefix else ""
        self.give_up = guest_give_up(runtime, guest)

    async def _poll(self, check: Callable[[], Awaitable[T]]) -> T:
        return await poll(check, self.deadline, give_up=self.give_up)

    async def websocket_101(self, record: StepRecord) -> None:
        """websockify (started by its socket on the first connection) upgrades, and relays
        to the VNC server: noVNC inside the guest works, though the controller's relay does
        not use it."""
        answer = await self._poll(
            lambda: websocket_upgrade(self.endpoint.address, self.endpoint.websockify_port)
        )
        self.timings[self.prefix + "start_to_websocket_101"] = time.monotonic() - self.started

        async def through_websockify() -> bytes:
            async with rfb_connect(self.endpoint.websocket_url, self.password) as client:
                return client.version

        version = await self._poll(through_websockify)
        record.detail = f"101, accept {answer['accept']}; relays {version.decode()}"

    async def rfb_handshake(self, record: StepRecord) -> None:
        async def attempt() -> str:
            async with rfb_connect(self.endpoint.vnc_url, self.password) as client:
                info = client.info
                assert info is not None
                if SECURITY_NONE in info.security_types:
                    raise VerificationFailed("the VNC server lets viewers in without a password")
                return f"{info.version.decode()} {info.width}x{info.height}"

        record.detail = await self._poll(attempt)

    async def non_blank_frame(self, record: StepRecord) -> None:
        shot = await self._poll(
            lambda: non_blank_frame(self.endpoint.vnc_url, self.password, self.deadline)
        )
        self.timings[self.prefix + "start_to_first_frame"] = time.monotonic() - self.started
        colours, dominant = shot.stats()
        self.screenshot.write_bytes(shot.png())
        record.detail = f"{colours} colours, largest {dominant:.0%}; saved {self.screenshot.name}"

    async def chromium_window(self, record: StepRecord) -> None:
        async def attempt() -> str:
            health = await agent_health(self.endpoint.agent_url, self.token)
            windows = health.get("windows", [])
            titles = [str(w["title"]) for w in windows if w.get("class") == "Chromium"]
            if not titles:
                raise ProbeError("no Chromium window on :1")
            return titles[0]

        record.detail = await self._poll(attempt)

    async def agent_health(self, record: StepRecord) -> None:
        async def attempt() -> str:
            health = await agent_health(self.endpoint.agent_url, self.token)
            if health.get("status") != "ok":
                raise ProbeError("; ".join(health.get("problems", [])) or "degraded")
            services = health.get("services", {})
            return ", ".join(f"{name} {s['version']}" for name, s in services.items())

        record.detail = await self._poll(attempt)


def _unit_check(rootfs: Path, contract: UnitContract, record: StepRecord) -> None:
    path = unit_path(rootfs, contract.name)
    if path is None:
        raise VerificationFailed(f"{contract.name} not installed")
    unit = parse_unit(path.read_text())
    argv = exec_start(unit)
    if contract.executable is not None and (not argv or argv[0] != contract.executable):
        raise VerificationFailed(
            f"{contract.name} runs {argv[0] if argv else 'nothing'}, not {contract.executable}"
        )
    if missing := [a for a in contract.required_args if a not in argv]:
        raise VerificationFailed(f"{contract.name} lacks arguments {' '.join(missing)}")
    if contract.one_of_args and not set(contract.one_of_args) & set(argv):
        raise VerificationFailed(f"{contract.name} needs one of {', '.join(contract.one_of_args)}")
    if bad := [a for a in contract.forbidden_args if a in argv]:
        raise VerificationFailed(f"{contract.name} must not use {' '.join(bad)}")
    env = " ".join(unit.get("Service", {}).get("Environment", [])).split()
    if missing_env := [e for e in contract.environment if e not in env]:
        raise VerificationFailed(f"{contract.name} does not set {' '.join(missing_env)}")
    after = " ".join(unit.get("Unit", {}).get("After", [])).split()
    if unordered := [u for u in contract.after if u not in after]:
        raise VerificationFailed(f"{contract.name} is not ordered after {' '.join(unordered)}")
    for setting in contract.settings:
        section, _, rest = setting.partition(".")
        key, _, value = rest.partition("=")
        if value not in unit.get(section, {}).get(key, []):
            raise VerificationFailed(f"{contract.name} lacks {key}={value} in [{section}]")
    if contract.enabled_in and not is_enabled(rootfs, contract.name, contract.enabled_in):
        raise VerificationFailed(f"{contract.name} is not enabled in {contract.enabled_in}")
    shown = argv or [s.partition(".")[2] for s in contract.settings]
    record.detail = " ".join(shown[:4]) + (" ..." if len(shown) > 4 else "")
