"""What an operator watches stays true to the code: docs/METRICS.md is the registry's own
listing; the alert rules pass `promtool check rules` and their unit tests (each alert fires
on its series and not on a near miss); the alert rules and the Grafana dashboard name only
metrics the controller exposes (and Prometheus's ``up``)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import REGISTRY

from master_controller.errors import VaultError
from master_controller.settings import REPO_ROOT, Settings
from master_controller.vault import Binding, Sealed, Vault
from master_controller.web.metrics_doc import metrics, render, series_names
from tests.conftest import require_tools

PROMETHEUS = REPO_ROOT / "deploy" / "prometheus"
DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "master-controller.json"
# Prometheus's own series a rule may name besides the controller's
PROMETHEUS_OWN = {"up"}
METRIC = re.compile(r"\b(mc_[a-z0-9_]+|up)\b(?!\s*\()")


def _names(expr: str) -> set[str]:
    # label values in quotes are not metric names
    return set(METRIC.findall(re.sub(r'"[^"]*"', '""', expr)))


def _alert_exprs() -> dict[str, str]:
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    return {r["alert"]: r["expr"] for g in rules["groups"] for r in g["rules"]}


def _dashboard_exprs() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    exprs += [v["query"] for v in board["templating"]["list"] if v["type"] == "query"]
    return exprs


def test_the_metrics_doc_is_the_registrys_listing() -> None:
    doc = (REPO_ROOT / "docs" / "METRICS.md").read_text()
    assert doc == render(), (
        "docs/METRICS.md differs from the registry: "
        "python -m master_controller.web.metrics_doc > docs/METRICS.md"
    )
    for metric in metrics():
        assert f"| `{metric.exposed}` |" in doc
        assert metric.help, f"{metric.name} has no help text"


def test_alert_rules_and_dashboard_name_only_exposed_metrics() -> None:
    known = series_names() | PROMETHEUS_OWN
    alerts = _alert_exprs()
    for wanted in (
        "MasterControllerDown",
        "CurrentImageNotVerified",
        "ImageVerificationFailing",
        "SessionsFailing",
        "DataDirFilling",
        "SessionCapacityExhausted",
        "VaultErrors",
    ):
        assert wanted in alerts
    for name, expr in alerts.items():
        used = _names(expr)
        assert used, f"alert {name} names no metric"
        assert used <= known, f"alert {name} names unknown metrics {used - known}"
    exprs = _dashboard_exprs()
    assert len(exprs) > 20
    for expr in exprs:
        used = _names(expr)
        assert used and used <= known, f"dashboard query {expr!r}: unknown {used - known}"
    # what the dashboard shows covers every controller metric but the build info's own
    shown = set().union(*(_names(e) for e in exprs))
    missing = {m.name for m in metrics()} - {n.removesuffix("_total") for n in shown}
    missing -= {n.removesuffix("_bucket") for n in shown}
    assert not missing, f"metrics on no dashboard panel: {missing}"


def test_the_name_check_catches_a_misspelt_metric() -> None:
    known = series_names() | PROMETHEUS_OWN
    assert _names('rate(mc_session_transition_total{state="failed"}[5m])') - known
    assert not _names('sum by (state) (mc_sessions{state=~"ready|mc_fake"})') - known


def _promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    require_tools("promtool")
    return subprocess.run(["promtool", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_promtool_checks_and_unit_tests_the_alert_rules() -> None:
    checked = _promtool("check", "rules", "alerts.yml", cwd=PROMETHEUS)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = _promtool("test", "rules", "alerts.test.yml", cwd=PROMETHEUS)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


@pytest.mark.parametrize("alert", ["SessionsFailing", "VaultErrors"])
def test_the_rule_tests_fail_when_a_rule_is_broken(tmp_path: Path, alert: str) -> None:
    """A rule that never fires makes its unit test fail: the tests do test the rules."""
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == alert:
                rule["expr"] = "vector(0) > 1"
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(rules))
    (tmp_path / "alerts.test.yml").write_text((PROMETHEUS / "alerts.test.yml").read_text())
    tested = _promtool("test", "rules", "alerts.test.yml", cwd=tmp_path)
    assert tested.returncode != 0 and alert in tested.stdout + tested.stderr


def test_vault_errors_are_counted_by_kind(tmp_path: Path) -> None:
    """A record that does not decrypt and one whose key is gone raise the vault error
    counter the VaultErrors alert watches, each under its kind."""
    vault = Vault.open(Settings(data_dir=tmp_path))
    bound = Binding("r-1", "alice", "oauth2", None)
    sealed = vault.seal(bound, b"secret")

    def count(kind: str) -> float:
        return REGISTRY.get_sample_value("mc_vault_errors_total", {"kind": kind}) or 0.0

    before = {kind: count(kind) for kind in ("undecryptable", "missing key")}
    with pytest.raises(VaultError):
        vault.open_sealed(Binding("r-1", "mallory", "oauth2", None), sealed)
    with pytest.raises(VaultError):
        vault.open_sealed(bound, Sealed("k-gone", sealed.nonce, sealed.ciphertext))
    assert count("undecryptable") == before["undecryptable"] + 1
    assert count("missing key") == before["missing key"] + 1
    assert vault.open_sealed(bound, sealed) == b"secret"
    assert count("undecryptable") == before["undecryptable"] + 1
