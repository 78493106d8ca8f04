"""The Helm chart, rendered by Helm itself (helm-python-sdk: Helm's Go SDK as a library; no helm
binary is published on PyPI or Debian), linted, every object validated offline against the
Kubernetes OpenAPI schemas (kubernetes-validate, strict: unknown fields fail), and cross-checked
against the server: probe paths, ports, settings, the init container's command, metric names.
The Prometheus Operator and Inference Extension objects (CRDs, no schema shipped in a registry
here) are checked field by field against the objects they point at, and the PrometheusRule's
groups go through promtool."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from foundry_local_py.config import DEFAULT_PORT, Settings
from foundry_local_py.server.metrics import Metrics, ModelState
from tests.ops import deploy
from tests.support.serving import REPO_ROOT

helm = pytest.importorskip("helm_python", reason="helm-python-sdk (dev extra) is not installed")
kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate (dev extra) is not installed")

K8S_VERSIONS = ("1.29", "1.33")
CRD_KINDS = {"ServiceMonitor", "PrometheusRule", "InferencePool"}
ALL_ON: dict[str, Any] = {
    "serviceMonitor": {"enabled": True},
    "prometheusRule": {"enabled": True},
    "autoscaling": {"enabled": True, "targetRunningRequests": "6"},
    "inferencePool": {"enabled": True},
    "networkPolicy": {"enabled": True,
                      "from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "x"}}}]},
    "cache": {"persistence": {"enabled": True}},
}
GATEWAY = yaml.safe_load((deploy.CHART / "values-inference-gateway.yaml").read_text())
CASES = {
    "defaults": {},
    "all-on": ALL_ON,
    "inference-gateway": GATEWAY,
    "inference-gateway+pool": {**GATEWAY, "inferencePool": {**GATEWAY["inferencePool"], "enabled": True}},
    "existing-secret": {**ALL_ON, "apiKey": {"existingSecret": "my-key", "secretKey": "token"}},
}


def render(values: dict[str, Any], release: str = "foundry-local") -> list[dict[str, Any]]:
    try:
        chart = helm.Chart.load(str(deploy.CHART))
    except OSError as exc:  # pragma: no cover - no native library for this platform
        pytest.skip(f"helm-python-sdk has no native library here: {exc}")
    with chart:
        out = chart.render(copy.deepcopy(values), name=release, namespace="inference")
    docs = [d for path, text in sorted(out.items()) if path.endswith(".yaml")
            for d in yaml.safe_load_all(text) if d]
    return docs


def by_kind(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    kinds: dict[str, dict[str, Any]] = {}
    for d in docs:
        assert d["kind"] not in kinds, f"two {d['kind']} objects"
        kinds[d["kind"]] = d
    return kinds


@pytest.fixture(scope="module", params=list(CASES))
def case(request: pytest.FixtureRequest) -> Iterator[tuple[str, dict[str, Any], dict[str, dict[str, Any]]]]:
    values = CASES[request.param]
    yield request.param, values, by_kind(render(values))


def test_helm_lint() -> None:
    report = helm.lint(str(deploy.CHART))
    assert not report["errors"], report
    assert all(m["severity"] < 3 for m in report["messages"]), report  # no warnings or errors


def test_kinds_rendered() -> None:
    assert set(by_kind(render({}))) == {"Deployment", "Service", "Secret", "PodDisruptionBudget"}
    assert set(by_kind(render(ALL_ON))) == {
        "Deployment", "Service", "Secret", "PodDisruptionBudget", "PersistentVolumeClaim",
        "HorizontalPodAutoscaler", "ServiceMonitor", "PrometheusRule", "InferencePool", "NetworkPolicy"}


def test_schema_validation(case: tuple[str, dict[str, Any], dict[str, dict[str, Any]]]) -> None:
    _, _, kinds = case
    for kind, obj in kinds.items():
        if kind in CRD_KINDS:
            continue
        for version in K8S_VERSIONS:
            kv.validate(obj, version, strict=True)


def test_the_validator_rejects_a_bad_object() -> None:
    dep = copy.deepcopy(by_kind(render({}))["Deployment"])
    dep["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["paht"] = "/health"
    with pytest.raises(kv.ValidationError):
        kv.validate(dep, K8S_VERSIONS[-1], strict=True)
    dep = copy.deepcopy(by_kind(render({}))["Deployment"])
    dep["spec"]["replicas"] = "two"
    with pytest.raises(kv.ValidationError):
        kv.validate(dep, K8S_VERSIONS[-1], strict=True)


def _container(kinds: dict[str, dict[str, Any]], name: str = "server") -> dict[str, Any]:
    spec = kinds["Deployment"]["spec"]["template"]["spec"]
    [c] = [c for c in spec["containers"] + spec.get("initContainers", []) if c["name"] == name]
    return c


def test_probes_ports_and_security_match_the_server(
    case: tuple[str, dict[str, Any], dict[str, dict[str, Any]]],
) -> None:
    from foundry_local_py.server.middleware import PUBLIC_PATHS
    from foundry_local_py.server.routes.health import router

    _, _, kinds = case
    c = _container(kinds)
    paths = {getattr(r, "path", None) for r in router.routes}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = c[probe]["httpGet"]
        assert get["path"] in paths and get["path"] in PUBLIC_PATHS, (probe, get)  # no key on probes
        assert get["port"] == "http"
    assert c["startupProbe"]["failureThreshold"] * c["startupProbe"]["periodSeconds"] >= 300
    [port] = c["ports"]
    assert port == {"name": "http", "containerPort": DEFAULT_PORT, "protocol": "TCP"}
    env = {e["name"]: e for e in c["env"]}
    assert env["FOUNDRY_LOCAL_PORT"]["value"] == str(DEFAULT_PORT)
    svc = kinds["Service"]["spec"]
    assert svc["ports"][0]["targetPort"] == "http"
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    assert svc["selector"] == kinds["Deployment"]["spec"]["selector"]["matchLabels"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    dockerfile = (REPO_ROOT / "Dockerfile").read_text().splitlines()
    dockerfile_uid = next(ln.split()[1].split(":")[0] for ln in dockerfile if ln.startswith("USER "))
    assert pod["securityContext"]["runAsUser"] == int(dockerfile_uid)
    for container in pod["containers"] + pod.get("initContainers", []):
        sc = container["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert {"/tmp", env["FOUNDRY_LOCAL_CACHE"]["value"]} <= mounts  # the only writable places
    labels = kinds["Deployment"]["spec"]["template"]["metadata"]["labels"]
    if "PodDisruptionBudget" in kinds:
        assert kinds["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_settings_parse_the_rendered_environment(
    case: tuple[str, dict[str, Any], dict[str, dict[str, Any]]], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every FOUNDRY_LOCAL_* variable the chart sets is a real setting and its value parses."""
    name, values, kinds = case
    fields = set(Settings.model_fields)
    for c in (_container(kinds), *kinds["Deployment"]["spec"]["template"]["spec"].get("initContainers", [])):
        for e in c["env"]:
            key = e["name"]
            if not key.startswith("FOUNDRY_LOCAL_"):
                continue
            field = {"FOUNDRY_LOCAL_CACHE": "cache_dir"}.get(key, key.removeprefix("FOUNDRY_LOCAL_").lower())
            if field == "allow_unauthenticated_remote" and field not in fields:
                continue  # the opt-out another change adds to Settings (docs/operations.md)
            assert field in fields, f"{name}: {key} is no setting"
            monkeypatch.setenv(key, e.get("value", "from-a-secret"))
        s = Settings()
        monkeypatch.undo()
        assert s.host in ("0.0.0.0", "127.0.0.1")
    server = {e["name"]: e for e in _container(kinds)["env"]}
    keyed = "FOUNDRY_LOCAL_API_KEY" in server
    assert keyed != ("FOUNDRY_LOCAL_ALLOW_UNAUTHENTICATED_REMOTE" in server), "exactly one of the two"
    assert keyed == (not values.get("allowUnauthenticatedRemote")), name
    if keyed:
        ref = server["FOUNDRY_LOCAL_API_KEY"]["valueFrom"]["secretKeyRef"]
        if values.get("apiKey", {}).get("existingSecret"):
            assert ref == {"name": "my-key", "key": "token"} and "Secret" not in kinds
        else:
            secret = kinds["Secret"]
            assert secret["metadata"]["name"] == ref["name"] and secret["data"][ref["key"]]


def test_init_container_downloads_with_the_real_cli(tmp_path: Path) -> None:
    kinds = by_kind(render({}))
    init = _container(kinds, "model-download")
    assert init["command"][:3] == ["foundry-local", "model", "download"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("FOUNDRY_LOCAL_")}
    env.update({"PYTHONPATH": str(REPO_ROOT), "FOUNDRY_LOCAL_CACHE": str(tmp_path / "cache"),
                "HOME": str(tmp_path)})
    r = subprocess.run([sys.executable, "-m", "foundry_local_py.cli.main", *init["command"][1:]],
                       env=env, capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0 and "Ready" in r.stdout, r.stdout + r.stderr


def test_monitoring_objects_point_at_the_right_things(tmp_path: Path) -> None:
    for values in (ALL_ON, CASES["inference-gateway+pool"]):
        kinds = by_kind(render(values))
        labels = kinds["Deployment"]["spec"]["template"]["metadata"]["labels"]
        sm = kinds["ServiceMonitor"]["spec"]
        assert sm["selector"]["matchLabels"].items() <= kinds["Service"]["metadata"]["labels"].items()
        [ep] = sm["endpoints"]
        assert ep["port"] == kinds["Service"]["spec"]["ports"][0]["name"] and ep["path"] == "/metrics"
        server_env = {e["name"]: e for e in _container(kinds)["env"]}
        if "FOUNDRY_LOCAL_API_KEY" in server_env:  # /metrics needs the key: the scrape sends it
            ref = server_env["FOUNDRY_LOCAL_API_KEY"]["valueFrom"]["secretKeyRef"]
            assert ep["authorization"] == {"type": "Bearer", "credentials": ref}
        else:
            assert "authorization" not in ep
        rule = kinds["PrometheusRule"]["spec"]
        assert rule == {"groups": yaml.safe_load(deploy.ALERTS.read_text())["groups"]}
        if deploy.tool("promtool"):
            rules_file = tmp_path / "rules.yml"
            rules_file.write_text(yaml.safe_dump(rule))
            r = deploy.run(["promtool", "check", "rules", str(rules_file)])
            assert r.returncode == 0, r.stdout + r.stderr
        pool = kinds["InferencePool"]
        assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
        assert pool["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert pool["spec"]["targetPorts"] == [{"number": DEFAULT_PORT}]
        assert pool["spec"]["endpointPickerRef"]["port"]["number"] == 9002
        hpa = kinds["HorizontalPodAutoscaler"]["spec"]
        assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                         "name": kinds["Deployment"]["metadata"]["name"]}
        assert "replicas" not in kinds["Deployment"]["spec"], "the HPA owns the replica count"


def test_hpa_and_picker_metrics_are_real_gauges() -> None:
    """Offline twin of test_metric_names: the HPA's and the endpoint picker's metrics are gauges
    of the server's own registry, per model."""
    m = Metrics()
    m.attach_state(lambda: [ModelState("m", "llama.cpp", "cpu", 1, 2, 64, 8, 0.5)], lambda: None)
    families = {f.name: f for f in m.registry.collect()}
    kinds = by_kind(render(ALL_ON))
    hpa_metrics = {x["pods"]["metric"]["name"] for x in kinds["HorizontalPodAutoscaler"]["spec"]["metrics"]}
    picker = yaml.safe_load(deploy.INFERENCEPOOL_VALUES.read_text())["inferenceExtension"]["flags"]
    wanted = hpa_metrics | {v for k, v in picker.items() if k.endswith("-metric") and v}
    assert wanted == {"foundry_local_requests_waiting", "foundry_local_requests_running",
                      "foundry_local_kv_cache_usage_ratio"}
    for name in wanted:
        assert families[name].type == "gauge", name
        assert [s.labels for s in families[name].samples] == [{"model": "m"}], name
    adapter = yaml.safe_load(deploy.ADAPTER_VALUES.read_text())["rules"]["custom"]
    served = {r["name"]["as"] for r in adapter}
    assert hpa_metrics <= served
