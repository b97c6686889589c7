"""One controller per data dir: the lock, the app's start-up, and `serve` as an operator runs
it twice (real processes; no guests)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from master_controller.errors import DataDirInUse
from master_controller.instance import LOCK_NAME, claim, ensure_free, running
from master_controller.runtimes.container import REQUIRED_TOOLS, ContainerRuntime
from master_controller.settings import Settings
from master_controller.web.app import create_app
from tests.conftest import require_tools
from tests.servers import free_port
from tests.web.inprocess import NoGuestRuntime, app_settings, serving, umask_of_process

# another process that takes the lock the way a controller does, then waits to be killed
HOLD = """
import sys, time
from pathlib import Path
from master_controller.instance import claim
from master_controller.settings import Settings
lock = claim(Settings(data_dir=Path(sys.argv[1]), port=int(sys.argv[2]), egress_port=0))
print("held", flush=True)
time.sleep(600)
"""


def _settings(tmp_path: Path, **overrides: object) -> Settings:
    return Settings(data_dir=tmp_path / "data", **overrides)  # type: ignore[arg-type]


@contextmanager
def holder(tmp_path: Path, port: int) -> Iterator[subprocess.Popen[str]]:
    """Another process holding ``tmp_path/data``'s lock, as a controller on ``port``."""
    env = {**os.environ, "MC_CONFIG": str(tmp_path / "none.toml")}
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path / "data"), str(port)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "held"
        yield process
    finally:
        process.kill()
        process.wait()


def test_a_second_holder_in_another_process_is_refused_by_name(tmp_path: Path) -> None:
    with holder(tmp_path, 4123) as other:
        with pytest.raises(DataDirInUse) as refused:
            claim(_settings(tmp_path))
        reason = refused.value.reason
        assert f"pid {other.pid}" in reason and "http://127.0.0.1:4123" in reason, reason
        assert "started 20" in reason and str(tmp_path / "data") in reason
        assert refused.value.status == 409
        seen = running(tmp_path / "data")
        assert seen is not None and seen.pid == other.pid and seen.port == 4123
        with pytest.raises(DataDirInUse):
            ensure_free(tmp_path / "data")


def test_the_lock_is_free_once_its_holder_is_killed(tmp_path: Path) -> None:
    with holder(tmp_path, 4123) as other:
        other.send_signal(signal.SIGKILL)  # no shutdown code runs: the file still names it
        other.wait()
        assert json.loads((tmp_path / "data" / LOCK_NAME).read_text())["pid"] == other.pid
        assert running(tmp_path / "data") is None
        with claim(_settings(tmp_path, port=4124)) as mine:
            assert mine.holder.pid == os.getpid()
            on_disk = json.loads((tmp_path / "data" / LOCK_NAME).read_text())
            assert on_disk["pid"] == os.getpid() and on_disk["port"] == 4124


def test_a_lock_file_naming_a_live_process_does_not_block(tmp_path: Path) -> None:
    """Only the lock decides: a file that names a live process (pid 1) but is not locked
    is taken over."""
    data = tmp_path / "data"
    data.mkdir()
    (data / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "127.0.0.1", "port": 9}))
    with claim(_settings(tmp_path)) as mine:
        assert json.loads((data / LOCK_NAME).read_text())["pid"] == os.getpid()
        assert mine.held


def test_held_until_released_then_emptied_and_free(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    lock = claim(settings)
    path = tmp_path / "data" / LOCK_NAME
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # a second claim in the same process is refused too (the lock is per open file)
    with pytest.raises(DataDirInUse) as refused:
        claim(settings, patience=0.1)
    assert f"pid {os.getpid()}" in refused.value.reason
    lock.release()
    lock.release()  # idempotent
    assert path.exists() and path.read_bytes() == b""
    assert running(settings.data_dir) is None
    claim(settings).release()


def test_checking_creates_nothing(tmp_path: Path) -> None:
    assert running(tmp_path / "data") is None
    ensure_free(tmp_path / "data")
    assert not (tmp_path / "data").exists()


async def test_a_second_app_in_the_same_process_refuses(tmp_path: Path) -> None:
    settings = app_settings(tmp_path, f"sqlite:///{tmp_path / 'mc.db'}", port=4555)
    async with serving(settings, NoGuestRuntime(settings)):
        second = NoGuestRuntime.with_probe(0.0)
        app = create_app(settings, second(settings))
        with pytest.raises(DataDirInUse) as refused:
            async with app.router.lifespan_context(app):
                pass
        assert f"pid {os.getpid()}" in refused.value.reason
        assert "http://127.0.0.1:4555" in refused.value.reason
        assert second.probe_calls == []


def _snapshot(folder: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every entry under ``folder``: mode, mtime and (for files) content."""
    return {
        str(p.relative_to(folder)): (
            p.lstat().st_mode,
            p.lstat().st_mtime_ns,
            p.read_bytes() if p.is_file() else b"",
        )
        for p in sorted(folder.rglob("*"))
    }


async def test_a_second_app_refuses_and_touches_nothing(tmp_path: Path) -> None:
    """The data dir of a controller (its database made by an earlier start) is held by
    another process: a new app's start-up fails with DataDirInUse before it migrates,
    probes, reconciles or writes anything."""
    settings = app_settings(tmp_path, f"sqlite:///{tmp_path / 'data' / 'mc.db'}")
    async with serving(settings, NoGuestRuntime(settings)):
        pass  # the database exists and is migrated, as a running controller's would be
    with holder(tmp_path, 4321) as other:
        before, umask = _snapshot(tmp_path), umask_of_process()
        runtime = NoGuestRuntime.with_probe(0.0)
        app = create_app(settings, runtime(settings))
        with pytest.raises(DataDirInUse) as refused:
            async with app.router.lifespan_context(app):
                pass
        assert f"pid {other.pid}" in refused.value.reason
        assert _snapshot(tmp_path) == before
        assert runtime.probe_calls == []
        assert umask_of_process() == umask


# --- `serve`, twice --------------------------------------------------------------------------

CONTAINER_TOOLS = REQUIRED_TOOLS


def _serve_env(tmp_path: Path, port: int) -> dict[str, str]:
    """`serve` with the container runtime and no egress. PATH holds only the container
    runtime's tools: without QEMU the runtime probes need no image to boot, so a promoted
    placeholder image is enough and start-up takes a second."""
    tools = tmp_path / "bin"
    if not tools.is_dir():
        tools.mkdir()
        for tool in CONTAINER_TOOLS:
            found = shutil.which(tool)
            assert found is not None
            (tools / tool).symlink_to(found)
    return {
        "PATH": str(tools),
        "COLUMNS": "400",  # one line per message (rich wraps at the terminal width)
        "MC_CONFIG": str(tmp_path / "none.toml"),
        "MC_DATA_DIR": str(tmp_path / "data"),
        "MC_HOST": "127.0.0.1",
        "MC_PORT": str(port),
        "MC_EGRESS_PORT": "0",
        "MC_RUNTIME": "container",
        "MC_SECRET_KEY_FILE": str(tmp_path / "secret.key"),
    }


def _placeholder_image(data_dir: Path) -> None:
    image = data_dir / "images" / "placeholder"
    image.mkdir(parents=True)
    (image / "manifest.json").write_text('{"name": "placeholder"}')
    (data_dir / "images" / "promotions.json").write_text(
        '{"history": [{"id": "placeholder", "at": "2025-01-01T00:00:00+00:00"}]}'
    )


def _cli() -> list[str]:
    installed = Path(sys.executable).parent / "master-controller"
    return (
        [str(installed)] if installed.exists() else [sys.executable, "-m", "master_controller.cli"]
    )


def test_a_second_serve_refuses_naming_the_first(tmp_path: Path) -> None:
    require_tools(*CONTAINER_TOOLS)
    probe = ContainerRuntime.probe(_settings(tmp_path))
    if not probe.usable:
        pytest.skip(f"the container runtime cannot start here: {probe.reason}")
    _placeholder_image(tmp_path / "data")
    first_port, second_port = free_port(), free_port()
    log = tmp_path / "first.log"
    with log.open("wb") as out:
        first = subprocess.Popen(
            [*_cli(), "serve"],
            env=_serve_env(tmp_path, first_port),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        url = f"http://127.0.0.1:{first_port}"
        while True:
            try:
                if httpx.get(f"{url}/health", trust_env=False, timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert first.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)

        second = subprocess.run(
            [*_cli(), "serve"],
            env=_serve_env(tmp_path, second_port),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert second.returncode == 1, second.stderr
        assert "Traceback" not in second.stderr, second.stderr
        message = " ".join(second.stderr.split())
        assert message.startswith("error: another controller is running on data dir"), message
        assert f"pid {first.pid}" in message and url in message and "started 20" in message
        assert "egress off" in message
        # the second one never listened; the first still serves
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{second_port}/health", trust_env=False, timeout=2)
        assert httpx.get(f"{url}/health", trust_env=False, timeout=5).status_code == 200

        first.send_signal(signal.SIGTERM)
        # uvicorn shuts down in order, then re-raises the signal it caught
        assert first.wait(timeout=30) in (0, -signal.SIGTERM), log.read_text()
        assert "Application shutdown complete" in log.read_text()
        assert (tmp_path / "data" / LOCK_NAME).read_bytes() == b""
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
