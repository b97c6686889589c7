"""One controller per data dir.

A controller holds an exclusive ``flock`` on ``<data_dir>/controller.lock`` (0600) for as
long as its process lives. The kernel drops the lock when the process dies, however it dies
(``kill -9`` included), so a lock file a dead controller left behind never blocks the next
one: the lock decides, never the file's content. The content (pid, listen address, egress
port, start time) only names the holder when a second controller is refused.

Two controllers on one data dir would each reconcile and reap the same guests; a second one
must therefore stop before it touches anything (database, guests, host resources).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import stat
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

from master_controller.errors import ConfigError, DataDirInUse
from master_controller.settings import Settings

LOCK_NAME = "controller.lock"
# A `running()` check holds the lock shared for microseconds; a controller starting at that
# moment tries again for this long before it believes another controller holds it.
PATIENCE = 0.5
MAX_CONTENT = 4096


@dataclass(frozen=True)
class Holder:
    """Who holds (or last held) a data dir, as its lock file says."""

    pid: int | None = None
    host: str | None = None
    port: int | None = None
    egress_port: int | None = None
    started: str | None = None  # ISO 8601, UTC
    hostname: str | None = None

    @classmethod
    def parse(cls, raw: bytes) -> Holder | None:
        """The holder a lock file's content names, or None if it names none (empty, being
        written, or not ours). Never trusted for a decision."""
        try:
            data = json.loads(raw.decode())
        except (UnicodeDecodeError, ValueError):
            return None
        if not isinstance(data, dict):
            return None

        def typed(name: str, kind: type) -> Any:
            value = data.get(name)
            return value if isinstance(value, kind) and not isinstance(value, bool) else None

        return cls(
            pid=typed("pid", int),
            host=typed("host", str),
            port=typed("port", int),
            egress_port=typed("egress_port", int),
            started=typed("started", str),
            hostname=typed("hostname", str),
        )

    @property
    def api(self) -> str | None:
        if self.host is None or self.port is None:
            return None
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def describe(self) -> str:
        parts = [
            f"pid {self.pid}" + (f" on {self.hostname}" if self.hostname else "")
            if self.pid is not None
            else None,
            f"API {self.api}" if self.api else None,
            f"egress port {self.egress_port}"
            if self.egress_port
            else ("egress off" if self.egress_port == 0 else None),
            f"started {self.started}" if self.started else None,
        ]
        return ", ".join(p for p in parts if p)


def refusal(data_dir: Path, holder: Holder | None) -> DataDirInUse:
    who = holder.describe() if holder is not None else ""
    named = f" ({who})" if who else " (it has not written who it is yet)"
    return DataDirInUse(
        f"another controller is running on data dir {data_dir}{named}; stop it first, "
        "or give this one a data_dir of its own",
        data_dir=data_dir,
        holder=holder,
    )


class ControllerLock:
    """This process is the data dir's controller while it holds this. ``release`` (or
    leaving the ``with`` block) empties the lock file and unlocks it; the file stays."""

    def __init__(self, path: Path, fd: int, holder: Holder) -> None:
        self.path = path
        self.holder = holder
        self._fd: int | None = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Idempotent."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> ControllerLock:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def claim(settings: Settings, patience: float = PATIENCE) -> ControllerLock:
    """Become the controller of ``settings.data_dir`` (created 0700 if missing), or raise
    DataDirInUse naming the one that is. Nothing else in the data dir is touched either way.
    The lock is held until ``release`` or the process ends."""
    data_dir = settings.data_dir
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = data_dir / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise ConfigError(f"cannot open the controller lock {path}: {exc}") from exc
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ConfigError(f"the controller lock {path} is not a plain file")
        deadline = time.monotonic() + patience
        while not _try_lock(fd, fcntl.LOCK_EX):
            if time.monotonic() >= deadline:
                raise refusal(data_dir, Holder.parse(os.pread(fd, MAX_CONTENT, 0)))
            time.sleep(0.05)
        os.fchmod(fd, 0o600)
        holder = Holder(
            pid=os.getpid(),
            host=settings.host,
            port=settings.port,
            egress_port=settings.egress_port,
            started=datetime.now(UTC).isoformat(timespec="seconds"),
            hostname=socket.gethostname(),
        )
        content = (json.dumps(asdict(holder), sort_keys=True) + "\n").encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, content, 0)
    except BaseException:
        os.close(fd)  # drops the lock too, if it was taken
        raise
    return ControllerLock(path, fd, holder)


def running(data_dir: Path) -> Holder | None:
    """The controller running on ``data_dir`` (as its lock file names it, possibly with
    nothing filled in), or None if none is. Creates and changes nothing."""
    path = data_dir / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"cannot open the controller lock {path}: {exc}") from exc
    try:
        if _try_lock(fd, fcntl.LOCK_SH):
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        return Holder.parse(os.pread(fd, MAX_CONTENT, 0)) or Holder()
    finally:
        os.close(fd)


def ensure_free(data_dir: Path) -> None:
    """Raise DataDirInUse if a controller runs on ``data_dir``. A check only: the lock is
    taken by the controller itself (``claim``), so two starting at once are still decided
    there."""
    holder = running(data_dir)
    if holder is not None:
        raise refusal(data_dir, holder if holder != Holder() else None)


def _try_lock(fd: int, kind: int) -> bool:
    try:
        fcntl.flock(fd, kind | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True
