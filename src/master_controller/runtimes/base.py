"""The one interface every guest runtime implements (container, qemu, firecracker).

Modelled on JupyterHub's Spawner: the controller asks a runtime to ``create`` a guest from
an image, ``start`` it, asks for its ``status``, ``endpoint`` and what to show of it
(``describe``), and ``hibernate``s, ``resume``s or ``destroy``s it. A guest's whole state is a
:class:`GuestState`, saved as JSON in the guest's folder after every change, so a restarted
controller can :meth:`Runtime.load` it and carry on (or clean up) from recorded ids alone.

Contract for implementations:

- ``create`` allocates what the guest needs (folder, address lease, per-guest config) and
  ``start`` brings up its host resources (network, disk layer, VMM process). Each is a
  sequence of named steps; if one fails, everything the call created is released before
  :class:`~master_controller.errors.GuestStartFailed` is raised.
- ``destroy`` releases everything, whatever state the guest is in, and may be called again.
- Nothing is found by name patterns: only by the ids recorded in the state.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, Field

from master_controller.diskspace import full_reason, is_full_error
from master_controller.errors import GuestNotFound, StorageFull
from master_controller.runtimes.guestlog import log_reason
from master_controller.settings import Settings
from master_controller.steps import StepLog
from mc_agent import AGENT_PORT, VNC_PORT, WEBSOCKIFY_PORT


class GuestStatus(StrEnum):
    CREATED = "created"  # resources allocated, never started
    RUNNING = "running"
    STOPPED = "stopped"
    HIBERNATED = "hibernated"
    DEAD = "dead"  # its process went away without being asked to
    DESTROYED = "destroyed"


@dataclass(frozen=True)
class ProbeResult:
    """Whether this host can run a runtime, and why (not)."""

    usable: bool
    reason: str
    # usable, but only when asked for by name: `auto` prefers others (QEMU without KVM)
    fallback_only: bool = False


class ProbeCache:
    """A runtime's latest probe result, refreshed by a background task, so that nothing
    answering a request ever runs a probe (one may boot a VM for up to 20 s, and even the
    cheap ones run commands). The probe itself runs in a worker thread, one at a time."""

    def __init__(self, runtime: type[Runtime], settings: Settings, interval: float) -> None:
        self.runtime = runtime
        self.settings = settings
        self.interval = interval
        self.result = ProbeResult(False, "not probed yet")
        self.checked_at: float | None = None  # time.time() of the last finished probe
        self._task: asyncio.Task[None] | None = None

    async def refresh(self) -> ProbeResult:
        try:
            result = await asyncio.to_thread(self.runtime.probe, self.settings)
        except Exception as exc:  # a probe that crashes says so; the next one may pass
            result = ProbeResult(False, f"the probe failed: {exc}")
        self.result, self.checked_at = result, time.time()
        return result

    def start(self) -> None:
        """Refresh every ``interval`` seconds from now on (call :meth:`refresh` first to
        have a result at once)."""
        self._task = asyncio.create_task(self._run(), name=f"probe {self.runtime.name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.refresh()


@dataclass(frozen=True)
class Endpoint:
    """Where the controller reaches a guest's services."""

    address: str
    websockify_port: int = WEBSOCKIFY_PORT
    agent_port: int = AGENT_PORT
    vnc_port: int = VNC_PORT

    @property
    def vnc_url(self) -> str:
        """The guest's VNC server (RFB over TCP): what the relay and readiness use."""
        return f"vnc://{self._host}:{self.vnc_port}"

    @property
    def websocket_url(self) -> str:
        """The guest's websockify (noVNC's path into the guest; image verification)."""
        return f"ws://{self._host}:{self.websockify_port}/"

    @property
    def _host(self) -> str:
        return f"[{self.address}]" if ":" in self.address else self.address

    @property
    def agent_url(self) -> str:
        return f"http://{self._host}:{self.agent_port}"


@dataclass(frozen=True)
class GuestFacts:
    """What may be shown of a guest outside the controller."""

    status: GuestStatus
    snapshot_bytes: int | None = None


class GuestSecrets(BaseModel):
    """Per-guest secrets handed to the guest through its configuration."""

    vnc_password: str
    agent_token: str


class GuestState(BaseModel):
    """Everything recorded about a guest. Runtime-specific ids go in ``resources``."""

    guest_id: str
    runtime: str
    image_id: str
    status: GuestStatus = GuestStatus.CREATED
    address: str | None = None
    secrets: GuestSecrets
    resources: dict[str, Any] = Field(default_factory=dict)
    created_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat())
    reason: str = ""


class Runtime(ABC):
    """Base class of guest runtimes. Subclasses live in their own modules."""

    name: ClassVar[str]

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    # --- capability ---------------------------------------------------------------------

    @classmethod
    @abstractmethod
    def probe(cls, settings: Settings) -> ProbeResult:
        """Whether this host can run guests with this runtime, and the reason if not."""

    # --- lifecycle ----------------------------------------------------------------------

    @abstractmethod
    async def create(
        self, guest_id: str, image_id: str, secrets: GuestSecrets, steps: StepLog | None = None
    ) -> GuestState:
        """Allocate the guest's folder, address and configuration. Nothing runs yet."""

    @abstractmethod
    async def start(self, guest: GuestState, steps: StepLog | None = None) -> None:
        """Bring up the guest's host resources and boot it. Returns once it is booting;
        readiness of the services inside is for the caller to check."""

    @abstractmethod
    async def destroy(self, guest: GuestState) -> None:
        """Release everything the guest holds. Idempotent."""

    @abstractmethod
    async def hibernate(self, guest: GuestState) -> None:
        """Save the guest so it can be resumed, and free its CPU and memory. If saving fails
        part-way, remove what was written, leave the guest running and raise HibernateFailed;
        any other error leaves the guest in an unknown state."""

    @abstractmethod
    async def resume(self, guest: GuestState, steps: StepLog | None = None) -> None:
        """Start a hibernated guest again."""

    @abstractmethod
    def status(self, guest: GuestState) -> GuestStatus:
        """The guest's status as the host sees it now (a running guest may be found dead)."""

    def describe(self, guest: GuestState) -> GuestFacts:
        """What the API shows of a guest: its status, and its snapshot's size once saved."""
        snapshot = guest.resources.get("snapshot") or {}
        size = snapshot.get("bytes") if isinstance(snapshot, dict) else None
        return GuestFacts(self.status(guest), size if isinstance(size, int) else None)

    def endpoint(self, guest: GuestState) -> Endpoint:
        if guest.address is None:
            raise GuestNotFound(f"guest {guest.guest_id} has no address")
        return Endpoint(address=guest.address)

    def diagnostics(self, guest: GuestState) -> str:
        """What the guest's console/VMM log says went wrong, for error messages: its
        error and failure lines (:func:`~master_controller.runtimes.guestlog.lines_that_matter`),
        not merely its last lines, which are mostly clean-up."""
        return log_reason(self.guest_dir(guest.guest_id) / "console.log")

    # --- state --------------------------------------------------------------------------

    def guest_dir(self, guest_id: str) -> Path:
        return self.settings.guests_dir / guest_id

    def save(self, guest: GuestState) -> None:
        folder = self.guest_dir(guest.guest_id)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / "state.json.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(guest.model_dump_json(indent=2))
            tmp.replace(folder / "state.json")
        except OSError as exc:  # the last saved state stays as it was
            tmp.unlink(missing_ok=True)
            if is_full_error(exc):
                raise StorageFull(full_reason(folder, "saving the guest's state")) from exc
            raise

    def load(self, guest_id: str) -> GuestState:
        path = self.guest_dir(guest_id) / "state.json"
        try:
            return GuestState.model_validate(json.loads(path.read_text()))
        except FileNotFoundError as exc:
            raise GuestNotFound(f"no guest {guest_id}") from exc

    def guests(self) -> list[GuestState]:
        """Every guest of this runtime recorded in the data directory."""
        found = []
        if self.settings.guests_dir.is_dir():
            for folder in sorted(self.settings.guests_dir.iterdir()):
                try:
                    state = self.load(folder.name)
                except (GuestNotFound, ValueError):
                    continue
                if state.runtime == self.name:
                    found.append(state)
        return found
