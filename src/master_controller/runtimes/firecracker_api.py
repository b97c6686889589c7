"""A typed client for Firecracker's HTTP API on its unix socket (httpx over UDS).

Requests are pydantic models named after the API's resources (machine-config, boot-source,
drives, network-interfaces, actions, vm, snapshot/create, snapshot/load). Firecracker answers
204 on success and ``{"fault_message": ...}`` otherwise; a fault becomes a
:class:`~master_controller.errors.GuestError` naming the request.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import httpx
from pydantic import BaseModel

from master_controller.errors import GuestError


class MachineConfig(BaseModel):
    vcpu_count: int
    mem_size_mib: int
    smt: bool = False


class BootSource(BaseModel):
    kernel_image_path: str
    initrd_path: str | None = None
    boot_args: str


class Drive(BaseModel):
    drive_id: str
    path_on_host: str
    is_root_device: bool
    is_read_only: bool


class NetworkInterface(BaseModel):
    iface_id: str
    host_dev_name: str
    guest_mac: str


class SnapshotCreate(BaseModel):
    snapshot_type: Literal["Full", "Diff"] = "Full"
    snapshot_path: str
    mem_file_path: str


class MemBackend(BaseModel):
    backend_type: Literal["File", "Uffd"] = "File"
    backend_path: str


class SnapshotLoad(BaseModel):
    snapshot_path: str
    mem_backend: MemBackend
    resume_vm: bool = True


class FirecrackerApi:
    """``async with FirecrackerApi(sock) as api: await api.put("machine-config", ...)``."""

    def __init__(self, socket: Path, timeout: float = 10.0) -> None:
        self.socket = socket
        self.timeout = timeout
        self.client = httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=str(socket)),
            base_url="http://firecracker",
            timeout=timeout,
            trust_env=False,
        )

    async def __aenter__(self) -> FirecrackerApi:
        deadline = asyncio.get_running_loop().time() + self.timeout
        while True:  # Firecracker creates its socket a moment after it starts
            try:
                await self.client.get("/")
                return self
            except httpx.TransportError as exc:
                if asyncio.get_running_loop().time() > deadline:
                    await self.client.aclose()
                    raise GuestError(f"Firecracker API {self.socket} unreachable: {exc}") from exc
                await asyncio.sleep(0.05)

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.client.aclose()

    async def instance(self) -> dict[str, Any]:
        """``GET /``: the instance's id, state (Not started, Running, Paused) and version."""
        return await self._call("GET", "/", None)

    async def put(self, resource: str, body: BaseModel) -> None:
        await self._call("PUT", f"/{resource}", body)

    async def patch(self, resource: str, body: BaseModel) -> None:
        await self._call("PATCH", f"/{resource}", body)

    async def _call(self, method: str, path: str, body: BaseModel | None) -> dict[str, Any]:
        try:
            response = await self.client.request(
                method, path, json=None if body is None else body.model_dump(exclude_none=True)
            )
        except httpx.HTTPError as exc:
            raise GuestError(f"Firecracker {method} {path} failed: {exc!r}") from exc
        if response.status_code >= 300:
            try:
                fault = response.json().get("fault_message", response.text)
            except ValueError:
                fault = response.text
            raise GuestError(f"Firecracker {method} {path}: {response.status_code} {fault}")
        if not response.content:
            return {}
        data: dict[str, Any] = response.json()
        return data


class InstanceStart(BaseModel):
    action_type: Literal["InstanceStart"] = "InstanceStart"


class VmState(BaseModel):
    state: Literal["Paused", "Resumed"]
