"""Prometheus metrics of the controller (served at /metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

SESSIONS = Gauge("mc_sessions", "Sessions by state", ["state"])
STEP_SECONDS = Histogram(
    "mc_session_step_seconds",
    "Duration of session start steps",
    ["step"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 80, 160),
)
PROXY_BYTES = Counter("mc_proxy_bytes", "Bytes relayed by the viewer proxy", ["direction"])
PROXY_CONNECTIONS = Gauge("mc_proxy_connections", "Viewer WebSockets open now")
PROXY_CONNECTIONS_TOTAL = Counter(
    "mc_proxy_connections_opened", "Viewer WebSockets opened", ["outcome"]
)
