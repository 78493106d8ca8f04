"""Prometheus metrics. One registry per app (no module-level state), exposed at /metrics.

Counters and histograms are updated by the serving code as requests complete; gauges that
describe current state (running / waiting requests, queue capacity, slots, KV cache use, loaded
models, cache size) are read from the model manager at scrape time by a custom collector, so they
can never drift.

The metric names are an interface: the Grafana dashboard, the alert rules, the autoscaler's
prometheus-adapter rules and the inference gateway's endpoint picker (``deploy/``) name them, and
``tests/ops`` checks each of those names against a live exposition.

Counters carry no ``_created`` series: nothing in ``deploy/`` reads them and they double the
number of series per counter. They are filtered per registry (:class:`_Registry`), not with
``prometheus_client.disable_created_metrics()``, which flips a process-wide switch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

PREFIX = "foundry_local"

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0)
_LOAD_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_DECLARED_ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
_DECLARED_STATUSES = ("200", "429", "500", "503")
"""The request series every loaded model has from the start (the alerts' errors and 429s)."""


@dataclass(frozen=True)
class ModelState:
    model: str
    engine: str
    device: str
    running: int
    waiting: int
    max_queue: int = 0
    """Requests that may wait for a slot before new ones get 429."""
    slots: int = 0
    """Sequences decoded together (``parallel``)."""
    kv_usage: float = 0.0
    """Fraction of the KV cache held by running sequences (0..1)."""
    lora_loaded: int = 0
    """LoRA adapters held in memory by the model's engine."""
    lora_running: tuple[str, ...] = ()
    """Adapters of running requests (vLLM's ``running_lora_adapters``)."""
    lora_waiting: tuple[str, ...] = ()
    max_lora: int = 0
    """Adapters kept loaded at most (``max_loras``; 0: the model's engine serves none)."""
    kv_tokens: int = 0
    """The KV cache's capacity in tokens (the shared pool's cells)."""


class _Registry(CollectorRegistry):
    """A registry whose exposition leaves out the ``_created`` samples of counters and histograms."""

    def collect(self) -> Iterator[Metric]:
        for metric in super().collect():
            samples = [s for s in metric.samples if not s.name.endswith("_created")]
            if len(samples) == len(metric.samples):
                yield metric
                continue
            copy = Metric(metric.name, metric.documentation, metric.type, metric.unit)
            copy.samples = samples
            yield copy


class _StateCollector(Collector):
    def __init__(
        self, states: Callable[[], Iterable[ModelState]], cache_size: Callable[[], int | None]
    ) -> None:
        self._states = states
        self._cache_size = cache_size

    def collect(self) -> Iterable[Metric]:
        running = GaugeMetricFamily(
            f"{PREFIX}_requests_running", "Requests being decoded now.", labels=["model"]
        )
        waiting = GaugeMetricFamily(
            f"{PREFIX}_requests_waiting", "Requests queued for a decode slot.", labels=["model"]
        )
        capacity = GaugeMetricFamily(
            f"{PREFIX}_queue_capacity",
            "Requests that may wait for a slot (max_queue); beyond it new requests get 429.",
            labels=["model"],
        )
        slots = GaugeMetricFamily(
            f"{PREFIX}_batch_slots", "Sequences decoded together (parallel slots).", labels=["model"]
        )
        kv = GaugeMetricFamily(
            f"{PREFIX}_kv_cache_usage_ratio",
            "KV cache used by running requests: cells they hold (shared prefix cells once) / the "
            "cells of the model's KV pool (0 to 1).",
            labels=["model"],
        )
        kv_tokens = GaugeMetricFamily(
            f"{PREFIX}_kv_cache_tokens",
            "Capacity of the model's KV cache in tokens (the shared pool all slots draw on).",
            labels=["model"],
        )
        loaded = GaugeMetricFamily(
            f"{PREFIX}_model_loaded", "1 for each loaded model.", labels=["model", "engine", "device"]
        )
        loras = GaugeMetricFamily(
            f"{PREFIX}_lora_adapters_loaded", "LoRA adapters held in memory per model.", labels=["model"]
        )
        lora_info = GaugeMetricFamily(
            f"{PREFIX}_lora_requests_info",
            "vLLM's lora_requests_info: the adapters of running and waiting requests (comma-"
            "separated) and max_lora, per model (value 1), so a router can prefer a replica that "
            "already holds an adapter.",
            labels=["model", "running_lora_adapters", "waiting_lora_adapters", "max_lora"],
        )
        for s in self._states():
            running.add_metric([s.model], s.running)
            waiting.add_metric([s.model], s.waiting)
            capacity.add_metric([s.model], s.max_queue)
            slots.add_metric([s.model], s.slots)
            kv.add_metric([s.model], s.kv_usage)
            kv_tokens.add_metric([s.model], s.kv_tokens)
            loaded.add_metric([s.model, s.engine, s.device], 1)
            loras.add_metric([s.model], s.lora_loaded)
            lora_info.add_metric([s.model, ",".join(s.lora_running), ",".join(s.lora_waiting),
                                  str(s.max_lora)], 1)
        yield running
        yield waiting
        yield capacity
        yield slots
        yield kv
        yield kv_tokens
        yield loaded
        yield loras
        yield lora_info
        size = self._cache_size()
        if size is not None:
            g = GaugeMetricFamily(f"{PREFIX}_cache_size_bytes", "Bytes used by the model cache.")
            g.add_metric([], size)
            yield g


class Metrics:
    def __init__(self) -> None:
        self.registry: CollectorRegistry = _Registry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            f"{PREFIX}_requests", "Requests served (adapter: the LoRA adapters used, '' for the base).",
            ["model", "endpoint", "status", "adapter"], registry=r
        )
        self.request_duration = Histogram(
            f"{PREFIX}_request_duration_seconds", "Time from arrival to the last byte.",
            ["model", "endpoint"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.ttft = Histogram(
            f"{PREFIX}_time_to_first_token_seconds", "Time from arrival to the first generated token.",
            ["model"], buckets=_TTFT_BUCKETS, registry=r,
        )
        self.itl = Histogram(
            f"{PREFIX}_inter_token_latency_seconds", "Time between generated tokens.",
            ["model"], buckets=_ITL_BUCKETS, registry=r,
        )
        self.prompt_tokens = Counter(
            f"{PREFIX}_prompt_tokens", "Prompt tokens processed.", ["model"], registry=r
        )
        self.generation_tokens = Counter(
            f"{PREFIX}_generation_tokens", "Tokens generated (adapter: as for requests).",
            ["model", "adapter"], registry=r
        )
        self.prefix_cache_queries = Counter(
            f"{PREFIX}_prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
            ["model"], registry=r,
        )
        self.prefix_cache_hits = Counter(
            f"{PREFIX}_prefix_cache_hits",
            "Prompt tokens found in the prefix cache (their KV entries were reused, not computed).",
            ["model"], registry=r,
        )
        self.model_load_seconds = Histogram(
            f"{PREFIX}_model_load_seconds", "Time to load a model.", ["model"],
            buckets=_LOAD_BUCKETS, registry=r,
        )
        self.download_bytes = Counter(
            f"{PREFIX}_download_bytes", "Bytes downloaded from model hubs.", ["model"], registry=r
        )
        self.model_load_failures = Counter(
            f"{PREFIX}_model_load_failures",
            "Times a model variant failed to load (each failed attempt, fallbacks included).",
            ["model"], registry=r,
        )
        self.internal_errors = Counter(
            f"{PREFIX}_internal_errors",
            "Unexpected exceptions caught (and survived) by background tasks.", ["component"], registry=r,
        )
        self.provider_fallbacks = Counter(
            f"{PREFIX}_provider_fallbacks",
            "Times a variant failed to initialise and the next one was used.",
            ["model", "failed_variant"], registry=r,
        )

    def declare_model(self, model: str) -> None:
        """Create ``model``'s counters at 0 when it loads, so that the first error or 429 after a
        start moves a series Prometheus already has (a series born at 1 shows no increase, and an
        alert on its rate would miss it)."""
        for endpoint in _DECLARED_ENDPOINTS:
            for status in _DECLARED_STATUSES:
                self.requests.labels(model, endpoint, status, "")
        self.prompt_tokens.labels(model)
        self.generation_tokens.labels(model, "")
        self.prefix_cache_queries.labels(model)
        self.prefix_cache_hits.labels(model)

    def prefix_cache_observer(self, model: str) -> Callable[[int, int], None]:
        """The scheduler's ``on_admit`` hook for ``model``: counts prefix-cache lookups and hits."""
        queries = self.prefix_cache_queries.labels(model)
        hits = self.prefix_cache_hits.labels(model)

        def observe(prompt_tokens: int, cached_tokens: int) -> None:
            queries.inc(prompt_tokens)
            if cached_tokens:
                hits.inc(cached_tokens)

        return observe

    def attach_state(
        self, states: Callable[[], Iterable[ModelState]], cache_size: Callable[[], int | None]
    ) -> None:
        self.registry.register(_StateCollector(states, cache_size))
