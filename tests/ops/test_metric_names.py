"""Every metric name that deploy/ (dashboard, alert rules, the chart's HPA and InferencePool,
prometheus-adapter rules, the endpoint picker's values), docs/operations.md and README name is in a live
server's /metrics: a rename on either side breaks this test. And the KV-cache gauge follows a real
request through the llama.cpp runner."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.ops import deploy
from tests.support.serving import REPO_ROOT, SMOLLM, poll, scrape

pytestmark = pytest.mark.slow

P = "foundry_local_"


def _files() -> dict[str, Path]:
    files = deploy.files_naming_metrics()
    files["docs/operations.md"] = REPO_ROOT / "docs" / "operations.md"
    files["README.md"] = REPO_ROOT / "README.md"
    return files


def test_every_metric_deploy_names_is_exposed(base_url: str) -> None:
    exposed = deploy.exposed_names(httpx.get(base_url + "/metrics", timeout=30).text)
    missing = []
    counted = 0
    for label, path in _files().items():
        names = deploy.metric_names(path.read_text())
        counted += len(names)
        missing += [f"{label}: {n}" for n in sorted(names - exposed)]
    assert not missing, "named but not exposed:\n" + "\n".join(missing)
    for must in ("dashboard", "alerts", "chart: templates/hpa.yaml", "prometheus-adapter rules",
                 "endpoint picker values"):
        assert deploy.metric_names(_files()[must].read_text()), must
    assert counted > 30


def test_routing_and_autoscaling_read_the_gauges_they_need() -> None:
    picker = deploy.metric_names(deploy.INFERENCEPOOL_VALUES.read_text())
    assert {P + "requests_waiting", P + "requests_running", P + "kv_cache_usage_ratio"} <= picker
    hpa = deploy.metric_names((deploy.CHART / "templates" / "hpa.yaml").read_text())
    adapter = deploy.metric_names(deploy.ADAPTER_VALUES.read_text())
    assert P + "requests_waiting" in hpa
    assert hpa <= adapter, "the HPA asks for a metric prometheus-adapter does not serve"


def test_kv_cache_gauge_follows_a_real_request(base_url: str) -> None:
    body = {"model": SMOLLM, "messages": [{"role": "user", "content": "Tell me a long story."}],
            "max_tokens": 200, "temperature": 0, "stream": True, "logit_bias": {"0": -100, "2": -100}}
    sel = {"model": SMOLLM}
    assert poll(lambda: scrape(base_url).get(P + "kv_cache_usage_ratio", **sel) == 0, 30), "not idle"
    seen: list[float] = []
    with httpx.Client(base_url=base_url, timeout=120) as c, \
            c.stream("POST", "/v1/chat/completions", json=body) as r:
        lines = r.iter_lines()
        for _ in range(20):
            next(lines)
        for _ in range(3):
            seen.append(scrape(base_url).get(P + "kv_cache_usage_ratio", **sel))
            for _ in range(10):
                next(lines)
        for _ in lines:
            pass
    m = scrape(base_url)
    capacity = m.get(P + "batch_slots", **sel)
    assert capacity >= 1
    # One sequence of ~30-60 tokens in a cache of slots x n_ctx tokens: a small positive share
    # that grows as the request decodes.
    assert all(0 < v < 1 / capacity for v in seen), seen
    assert seen == sorted(seen) and seen[-1] > seen[0], seen
    assert poll(lambda: scrape(base_url).get(P + "kv_cache_usage_ratio", **sel) == 0, 10)
