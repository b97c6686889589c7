"""Guest runtimes, chosen by name. Each lives in its own module (see :mod:`.base`)."""

from __future__ import annotations

from master_controller.errors import ConfigError, RuntimeUnavailable
from master_controller.runtimes.base import ProbeResult, Runtime
from master_controller.runtimes.container import ContainerRuntime
from master_controller.runtimes.firecracker import FirecrackerRuntime
from master_controller.runtimes.qemu import QemuRuntime
from master_controller.settings import Settings

RUNTIMES: dict[str, type[Runtime]] = {
    ContainerRuntime.name: ContainerRuntime,
    QemuRuntime.name: QemuRuntime,
    FirecrackerRuntime.name: FirecrackerRuntime,
}

# Best isolation first; the first whose probe passes is the default.
PREFERENCE = ("firecracker", "qemu", "container")


def probe_all(settings: Settings) -> dict[str, ProbeResult]:
    return {name: RUNTIMES[name].probe(settings) for name in PREFERENCE}


def get_runtime(name: str, settings: Settings) -> Runtime:
    """The runtime ``name`` if this host can run it; otherwise RuntimeUnavailable says why."""
    if name not in RUNTIMES:
        raise ConfigError(f"unknown runtime {name!r}; known: {', '.join(PREFERENCE)}")
    result = probe_all(settings)[name]
    if not result.usable:
        raise RuntimeUnavailable(f"runtime {name} cannot run here: {result.reason}")
    return RUNTIMES[name](settings)


def best_runtime(settings: Settings) -> Runtime:
    """The first usable runtime in order of isolation, skipping slow fallbacks (QEMU without
    KVM) while a faster runtime is usable."""
    probes = probe_all(settings)
    usable = [n for n, r in probes.items() if r.usable]
    preferred = [n for n in usable if not probes[n].fallback_only]
    for name in preferred or usable:
        return RUNTIMES[name](settings)
    raise RuntimeUnavailable("no runtime can run on this host; run `master-controller doctor`")
