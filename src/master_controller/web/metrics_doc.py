"""docs/METRICS.md, written from the metrics registry itself: every ``mc_*`` metric the
controller registers, with its type, labels and help. A test compares the file with this
output, so the document cannot drift from the code::

    python -m master_controller.web.metrics_doc > docs/METRICS.md
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import REGISTRY
from prometheus_client.metrics import MetricWrapperBase

# the series each type exposes, by suffix of the metric's name
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "info": ("_info",),
}

HEADER = """\
# Metrics

The controller serves these at `GET /metrics` (Prometheus text format, no API key: keep the
port off the internet or filter `/metrics` at the proxy). Generated from the registry by
`python -m master_controller.web.metrics_doc > docs/METRICS.md`; `tests/test_metrics_doc.py`
fails when this file and the code differ.

`mc_sessions`, `mc_images`, `mc_current_image_verified`, `mc_data_dir_*`, `mc_max_sessions`
and `mc_build_info` are read when `/metrics` is fetched (from the database, the image store
and the file system); the rest change as things happen. A counter's `_created` series and a
histogram's `_bucket`, `_sum`, `_count` come with it as usual.

Alert rules using them: `deploy/prometheus/alerts.yml` (unit-tested with `promtool test
rules`); a dashboard: `deploy/grafana/master-controller.json`.

| metric | type | labels | what it says |
|---|---|---|---|
"""


@dataclass(frozen=True)
class MetricDoc:
    name: str  # as registered (a counter's without _total)
    type: str
    labels: tuple[str, ...]
    help: str

    @property
    def exposed(self) -> str:
        """The name a query uses (a counter's with _total)."""
        return self.name + ("_total" if self.type == "counter" else "")

    def series(self) -> list[str]:
        return [self.name + suffix for suffix in SUFFIXES[self.type]]


def metrics() -> list[MetricDoc]:
    """Every mc_* metric registered once the whole controller is imported."""
    import master_controller.web.app  # noqa: F401  (registers every module's metrics)

    found = [
        MetricDoc(c._name, str(c._type), tuple(c._labelnames), c._documentation)
        for c in list(REGISTRY._collector_to_names)
        if isinstance(c, MetricWrapperBase) and c._name.startswith("mc_")
    ]
    return sorted(found, key=lambda m: m.name)


def series_names() -> set[str]:
    """Every series name the controller can expose (what a query may name)."""
    return {name for m in metrics() for name in m.series()}


def render() -> str:
    rows = [
        f"| `{m.exposed}` | {m.type} | {', '.join(f'`{label}`' for label in m.labels) or '-'} "
        f"| {m.help.replace('|', '/')} |"
        for m in metrics()
    ]
    return HEADER + "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(render(), end="")
