"""Shared fixtures. Capability skips become failures under CI=true (a missing install step
must not hide behind a skip)."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from master_controller.images.builder import ImageBuilder
from master_controller.images.recipe import Recipe
from master_controller.images.store import ImageStore
from master_controller.runtimes import RUNTIMES
from master_controller.runtimes.container import ContainerRuntime
from master_controller.settings import REPO_ROOT, Settings
from master_controller.verification import Verifier
from tests.servers import have_postgresql, postgresql_database, postgresql_server

IN_CI = os.environ.get("CI") == "true"
# Integration tests keep their own data dir (not the operator's), cached across runs.
TEST_DATA_DIR = Path(os.environ.get("MC_TEST_DATA_DIR", "/var/lib/master-controller-test"))
RECIPES = Path(__file__).parent / "fixtures" / "recipes"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped and "allowed in CI" not in str(report.longrepr):
        report.outcome = "failed"
        report.longrepr = f"capability skip is a failure under CI=true: {report.longrepr}"


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces, mounts, systemd-nspawn)")


def require_tools(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)} (run scripts/setup.sh)")


@pytest.fixture
def tmp_settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data")


@pytest.fixture(scope="session")
def integration_settings() -> Settings:
    require_root()
    require_tools("mmdebstrap", "systemd-nspawn", "mkfs.ext4")
    settings = Settings(data_dir=TEST_DATA_DIR, guest_network="10.213.128.0/20")
    # guests an interrupted earlier run left behind: found by their recorded state only
    for runtime_class in RUNTIMES.values():
        runtime = runtime_class(settings)
        for guest in runtime.guests():
            asyncio.run(runtime.destroy(guest))
    return settings


@pytest.fixture(scope="session")
def golden_image(integration_settings: Settings) -> str:
    """The default recipe's image: built (cached by input digest), verified, promoted."""
    settings = integration_settings
    built = ImageBuilder(settings).build(Recipe.load(settings.recipe))
    store = ImageStore(settings.images_dir)
    if not store.get(built.image_id).verified:
        result = asyncio.run(Verifier(settings, ContainerRuntime(settings)).verify(built.image_id))
        assert result["passed"], result["failures"]
    store.promote(built.image_id)
    return built.image_id


@pytest.fixture
def container_runtime(integration_settings: Settings) -> Iterator[ContainerRuntime]:
    runtime = ContainerRuntime(integration_settings)
    yield runtime
    # a test that failed half-way must not leave guests behind
    for guest in runtime.guests():
        asyncio.run(runtime.destroy(guest))


@pytest.fixture
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def postgresql() -> Iterator[str]:
    """A real PostgreSQL server (URL template with {db})."""
    require_root()
    if not have_postgresql():
        pytest.skip("PostgreSQL is not installed (run scripts/setup.sh)")
    with postgresql_server() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database of each kind."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'mc.db'}"
        return
    server = request.getfixturevalue("postgresql")
    with postgresql_database(server, f"mc_test_{os.getpid()}") as url:
        yield url
