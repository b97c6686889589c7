"""The controller's own health, and the host's: liveness and readiness for load balancers
and deploy scripts, the host's CPU, memory and disks for the operator's dashboard, and the
answer to a WebRTC client (we stream with noVNC)."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text

from master_controller import __version__
from master_controller.images.store import ImageStore
from master_controller.network.firewall import GUEST_LINKS
from master_controller.runtimes.base import ProbeCache
from master_controller.sessions.states import ACTIVE, State
from master_controller.store import repo
from master_controller.web.deps import Services, require_scope, services

router = APIRouter(tags=["health"])
GIB = 2**30
CPU_SAMPLE_SECONDS = 0.25
# the words health checks look for (the original's deploy scripts grep for "healthy")
HEALTHY, DEGRADED = "healthy", "degraded"
GUEST_LINK_PREFIX = GUEST_LINKS.rstrip("*")


@router.get("/health")
async def health() -> dict[str, str]:
    """Liveness: the process answers."""
    return {"status": HEALTHY, "version": __version__}


async def readiness(request: Request, svc: Services) -> dict[str, Any]:
    """Runtime (its latest background probe), current image, database, capacity. Never
    probes the runtime itself, so any number of callers cost no more than a database query
    each."""
    probes: ProbeCache = request.app.state.probes
    probe = probes.result
    checked = probes.checked_at
    try:
        async with svc.db.session() as db:
            await db.execute(text("SELECT 1"))
            counts = await repo.count_by_state(db)
        database = "ok"
    except Exception as exc:
        counts, database = {}, f"error: {exc}"
    active = sum(n for s, n in counts.items() if State(s) in ACTIVE)
    current = ImageStore(svc.settings.images_dir).current()
    healthy = probe.usable and current is not None and database == "ok"
    return {
        "status": "ok" if healthy else DEGRADED,
        "runtime": {
            "name": svc.runtime.name,
            "usable": probe.usable,
            "reason": probe.reason,
            "checkedAt": None
            if checked is None
            else datetime.fromtimestamp(checked, UTC).isoformat(timespec="seconds"),
        },
        "image": {"current": current},
        "database": database,
        "capacity": {
            "max": svc.settings.max_sessions,
            "active": active,
            "free": max(0, svc.settings.max_sessions - active),
        },
        "sessions": counts,
    }


@router.get("/api/health")
async def api_health(request: Request, svc: Services = Depends(services)) -> dict[str, Any]:
    """Readiness, in detail (``status``: ``ok`` or ``degraded``)."""
    return await readiness(request, svc)


@router.get("/api/auth/health")
async def auth_health(request: Request, svc: Services = Depends(services)) -> JSONResponse:
    """Whether sign-ins can start: ``healthy`` (200), or ``degraded`` (503) with the
    readiness details that say why."""
    ready = await readiness(request, svc)
    ok = ready["status"] == "ok"
    body = {**ready, "status": HEALTHY if ok else DEGRADED}
    return JSONResponse(body, status_code=200 if ok else 503)


def _gb(n: float) -> float:
    return round(n / GIB, 2)


def _host_figures() -> dict[str, Any]:
    """CPU (sampled over a quarter second), memory, each mounted disk, the network
    interfaces, temperature, uptime and load (blocking), in the original dashboard's
    names."""
    cpu = psutil.cpu_percent(interval=CPU_SAMPLE_SECONDS)
    memory = psutil.virtual_memory()
    mounts = []
    for part in psutil.disk_partitions(all=False):
        try:
            usage = psutil.disk_usage(part.mountpoint)
        except OSError:
            continue
        mounts.append(
            {
                "mount_point": part.mountpoint,
                "device": part.device,
                "fstype": part.fstype,
                "total_gb": _gb(usage.total),
                "used_gb": _gb(usage.used),
                "available_gb": _gb(usage.free),
                "usage_percent": usage.percent,
            }
        )
    interfaces = [
        {"interface": name, "rx_bytes": io.bytes_recv, "tx_bytes": io.bytes_sent}
        for name, io in sorted(psutil.net_io_counters(pernic=True).items())
        if not name.startswith(GUEST_LINK_PREFIX)  # one per guest: not the host's own
    ]
    up = [name for name, st in psutil.net_if_stats().items() if st.isup and name != "lo"]
    load1, load5, load15 = psutil.getloadavg()
    return {
        "cpu": {"usage_percent": cpu, "cores": psutil.cpu_count() or 1, "model": _cpu_model()},
        "memory": {
            "total_gb": _gb(memory.total),
            "used_gb": _gb(memory.total - memory.available),
            "free_gb": _gb(memory.available),
            "usage_percent": memory.percent,
        },
        "disk": {"all_mounts": mounts},
        "network": {"interfaces": interfaces},
        "network_health": {"status": "healthy" if up else "down", "interfaces_up": len(up)},
        "temperature": _temperature(),
        "uptime": {"uptime_seconds": int(time.time() - psutil.boot_time())},
        "load": {"load_1min": load1, "load_5min": load5, "load_15min": load15},
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _temperature() -> dict[str, Any]:
    sensors = getattr(psutil, "sensors_temperatures", None)
    readings = [t for group in (sensors() if sensors else {}).values() for t in group]
    if not readings:
        return {"available": False, "current": None, "critical": None}
    hottest = max(readings, key=lambda t: t.current)
    return {"available": True, "current": hottest.current, "critical": hottest.critical}


@router.get("/api/admin/health/system", dependencies=[require_scope("admin")])  # type: ignore[list-item]
async def system_health(svc: Services = Depends(services)) -> dict[str, Any]:
    """The host's CPU use, memory and disks, and the guests it holds (admin keys)."""
    figures = await asyncio.to_thread(_host_figures)
    async with svc.db.session() as db:
        counts = await repo.count_by_state(db)
    figures["sessions"] = counts
    figures["runtime"] = svc.runtime.name
    return figures


NO_WEBRTC = (
    "this controller streams the guest's screen with noVNC, not WebRTC: open the session's novncURL"
)


@router.get("/api/webrtc/ice-servers")
async def ice_servers() -> dict[str, Any]:
    """No WebRTC here: the guest's screen is streamed with noVNC over the controller's
    WebSocket relay (a session's ``novncURL``). The answer says so, with an empty server
    list, so a client that would offer WebRTC goes on with noVNC. Needs no key: it holds
    nothing (the original's health check asks it)."""
    return {
        "success": True,
        "iceServers": [],
        "webrtc": False,
        "streaming": "novnc",
        "reason": NO_WEBRTC,
    }


@router.get("/api/webrtc/stats")
async def webrtc_stats() -> dict[str, Any]:
    """WebRTC sessions: none, ever (see ``/api/webrtc/ice-servers``)."""
    return {"success": True, "webrtc": False, "activeSessions": 0, "reason": NO_WEBRTC}
