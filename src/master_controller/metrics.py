"""Prometheus metrics of the controller (served at /metrics). Every metric is listed in
docs/METRICS.md, generated from the registry (``python -m master_controller.web.metrics_doc``);
a test fails when the two differ."""

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
# sampled by master_controller.looplag: how late the event loop woke a sleeping task
LOOP_LAG_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
LOOP_LAG = Histogram(
    "mc_event_loop_lag_seconds",
    "How late the event loop ran a task that was due (every viewer waits as long)",
    buckets=LOOP_LAG_BUCKETS,
)
LOOP_LAG_MAX = Gauge(
    "mc_event_loop_lag_max_seconds", "The largest event loop lag in the last minute"
)
# admission (sessions.admission): boots wait for a slot instead of overloading the host
BOOT_QUEUE = Gauge("mc_boot_queue", "Starts waiting for a boot slot")
BOOT_SLOTS_IN_USE = Gauge("mc_boot_slots_in_use", "Guests booting or resuming now")
BOOT_QUEUE_WAIT = Histogram(
    "mc_boot_queue_wait_seconds",
    "How long a start waited for a boot slot",
    buckets=(0.01, 0.1, 0.5, 1, 2, 5, 10, 20, 40, 80, 160),
)
START_RETRIES = Counter(
    "mc_session_start_retries", "Starts retried on a fresh guest after a transient failure"
)
SESSION_TRANSITIONS = Counter(
    "mc_session_transitions",
    "Sessions entering each state (provisioning: sessions started; failed: sessions failed)",
    ["state"],
)
# vault errors by kind: "undecryptable" (a record altered, or not this key's), "missing key"
# (a record's key is not in the key file), "key file" (unreadable or gone), "busy" (a
# rotation held the lock too long)
VAULT_ERRORS = Counter(
    "mc_vault_errors",
    "Vault operations that failed, by kind: undecryptable, missing key, key file, busy",
    ["kind"],
)
# sampled at every scrape of /metrics
IMAGES = Gauge("mc_images", "Images in the store, by verification status", ["verification"])
CURRENT_IMAGE_VERIFIED = Gauge(
    "mc_current_image_verified",
    "1 if the current image passed a full verification (static and boot), else 0 (also when "
    "no image is current)",
)
DATA_DIR_FREE = Gauge(
    "mc_data_dir_free_bytes", "Bytes free to the controller on the data dir's file system"
)
DATA_DIR_SIZE = Gauge("mc_data_dir_size_bytes", "Size of the data dir's file system in bytes")
MAX_SESSIONS = Gauge("mc_max_sessions", "Concurrent live sessions this host allows (max_sessions)")
BUILD_INFO = Gauge("mc_build_info", "Always 1; the running release in its labels", ["version"])
