"""A small typed client for QEMU's monitor (QMP), on the ``qemu.qmp`` package.

Errors from QEMU or the socket become :class:`~master_controller.errors.GuestError` with
the command's name in the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from types import TracebackType
from typing import Any

from qemu.qmp import ExecuteError, QMPClient, QMPError

from master_controller.errors import GuestError


class Qmp:
    def __init__(self, socket: Path, timeout: float = 10.0) -> None:
        self.socket = socket
        self.timeout = timeout
        self.client = QMPClient("master-controller")

    async def __aenter__(self) -> Qmp:
        deadline = asyncio.get_running_loop().time() + self.timeout
        while True:  # QEMU creates its socket a moment after it starts
            try:
                await self.client.connect(str(self.socket))
                return self
            except (QMPError, OSError) as exc:
                if asyncio.get_running_loop().time() > deadline:
                    raise GuestError(f"QMP socket {self.socket} unreachable: {exc}") from exc
                await asyncio.sleep(0.1)

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        # after "quit" QEMU closes the socket first; there is nothing left to say then
        with contextlib.suppress(QMPError, EOFError, OSError):
            await self.client.disconnect()

    async def command(self, name: str, **arguments: Any) -> Any:
        try:
            return await asyncio.wait_for(
                self.client.execute(name, arguments or None), self.timeout
            )
        except ExecuteError as exc:
            raise GuestError(f"QMP {name} failed: {exc}") from exc
        except (QMPError, OSError, TimeoutError) as exc:
            raise GuestError(f"QMP {name} failed: {exc!r}") from exc

    async def send_fd(self, fd: int, name: str) -> None:
        """Hand QEMU an open file descriptor (SCM_RIGHTS) under ``name`` (``getfd``); we keep
        our own copy and close it ourselves."""
        try:
            self.client.send_fd_scm(fd)
        except (QMPError, OSError) as exc:
            raise GuestError(f"passing a file to QEMU failed: {exc!r}") from exc
        await self.command("getfd", fdname=name)

    async def status(self) -> str:
        return str((await self.command("query-status"))["status"])

    async def wait_migration(self, timeout: float) -> dict[str, Any]:
        """Poll query-migrate until the migration ends; returns its last report."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            report: dict[str, Any] = await self.command("query-migrate")
            if report.get("status") in ("completed", "failed", "cancelled"):
                return report
            if asyncio.get_running_loop().time() > deadline:
                raise GuestError(f"migration did not finish within {timeout:.0f}s: {report}")
            await asyncio.sleep(0.1)
