"""Fast checks of deploy/ without a server: the alert rules (promtool check and unit tests), the
dashboard's shape (importable, variables, the panels the issue lists), Grafana provisioning."""

from __future__ import annotations

import pytest
import yaml

from tests.ops import deploy

needs_promtool = pytest.mark.skipif(
    deploy.tool("promtool") is None,
    reason="promtool not installed (Debian package 'prometheus'; scripts/test installs it as root)",
)


@needs_promtool
def test_promtool_check_rules() -> None:
    r = deploy.run(["promtool", "check", "rules", str(deploy.ALERTS)])
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(deploy.alert_rules())} rules found" in r.stdout


@needs_promtool
def test_promtool_unit_tests_of_the_alerts() -> None:
    """alerts_test.yml: each alert fires on synthetic series that should fire it, not before its
    `for`, not on the series beside it that should not, with its summary and description."""
    r = deploy.run(["promtool", "test", "rules", deploy.ALERTS_TEST.name], cwd=deploy.PROMETHEUS_DIR)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout
    tested = {case["alertname"] for test in yaml.safe_load(deploy.ALERTS_TEST.read_text())["tests"]
              for case in test["alert_rule_test"] if case["exp_alerts"]}
    assert tested == {rule["alert"] for rule in deploy.alert_rules()}, "an alert without a firing test"


@needs_promtool
def test_promtool_check_config() -> None:
    r = deploy.run(["promtool", "check", "config", deploy.PROMETHEUS_CONFIG.name], cwd=deploy.PROMETHEUS_DIR)
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_alert_has_summary_description_and_severity() -> None:
    rules = deploy.alert_rules()
    names = {r["alert"] for r in rules}
    assert {"FoundryLocalTargetDown", "FoundryLocalHighErrorRate", "FoundryLocalSlowTimeToFirstToken",
            "FoundryLocalQueueNearlyFull", "FoundryLocalRequestsRejected",
            "FoundryLocalModelLoadFailed"} <= names
    for rule in rules:
        assert rule["annotations"]["summary"].strip(), rule["alert"]
        assert len(rule["annotations"]["description"]) > 60, rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]


def test_chart_carries_the_same_alert_rules() -> None:
    assert (deploy.CHART / "files" / "alerts.yml").read_text() == deploy.ALERTS.read_text(), (
        "copy deploy/prometheus/alerts.yml to deploy/helm/foundry-local/files/alerts.yml")


def test_dashboard_is_importable() -> None:
    dash = deploy.dashboard()
    assert dash["schemaVersion"] >= 36
    assert dash["uid"] and dash["title"]
    assert "id" not in dash or dash["id"] is None, "an exported id makes import collide"
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["model"]["type"] == "query"
    assert variables["model"]["includeAll"] and variables["model"]["multi"]
    ids = [p["id"] for p in deploy.panels(dash)]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    for panel in deploy.panels(dash):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
            if "model" not in target["expr"] or "cache_size" in target["expr"]:
                continue
            assert 'model=~"$model"' in target["expr"], (panel["title"], target["expr"])


def test_dashboard_has_the_panels_the_issue_lists() -> None:
    titles = " | ".join(p["title"].lower() for p in deploy.panels(deploy.dashboard()))
    for words in ["requests/s by status", "time to first token p50 / p95", "inter-token latency p50 / p95",
                  "output tokens/s", "running and waiting", "kv cache", "prefix-cache hit rate",
                  "loaded models (engine, device)", "model load time", "download bytes",
                  "provider fallbacks"]:
        assert words in titles, words


def test_grafana_provisioning() -> None:
    prov = deploy.DEPLOY / "grafana" / "provisioning"
    ds = yaml.safe_load((prov / "datasources" / "foundry-local.yml").read_text())
    assert ds["apiVersion"] == 1
    assert ds["datasources"][0]["type"] == "prometheus"
    dashboards = yaml.safe_load((prov / "dashboards" / "foundry-local.yml").read_text())
    provider = dashboards["providers"][0]
    assert provider["type"] == "file" and provider["options"]["path"]


def test_split_comparison() -> None:
    assert deploy.split_comparison('up{job=~".*x.*"} == 0') == ('up{job=~".*x.*"}', "==", "0")
    left = "max by (a) (x / (y > 0))"
    assert deploy.split_comparison(left + " > 0.8") == (left, ">", "0.8")
    assert deploy.split_comparison('sum(rate(x{status!="200"}[5m]))') is None
    for e in deploy.alert_exprs():
        assert deploy.split_comparison(e.expr) is not None, e.source
