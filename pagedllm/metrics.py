"""Prometheus metrics with vLLM's names under a `pagedllm:` prefix.

Gauges and counters are read from the engine at scrape time (no bookkeeping on the hot path);
latency histograms are observed once per finished request.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from pagedllm.engine.llm_engine import LLMEngine
from pagedllm.outputs import RequestOutput

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)


class _EngineCollector:
    def __init__(self, engine: LLMEngine, labels: dict[str, str]):
        self.engine, self.labels = engine, labels

    def _family(self, cls, name: str, doc: str, value: float):
        fam = cls(name, doc, labels=list(self.labels))
        fam.add_metric(list(self.labels.values()), value)
        return fam

    def collect(self):
        e, s = self.engine, self.engine.scheduler
        yield self._family(GaugeMetricFamily, "pagedllm:num_requests_running", "Sequences in the running batch",
                           len(s.running))
        yield self._family(GaugeMetricFamily, "pagedllm:num_requests_waiting", "Sequences waiting to be scheduled",
                           len(s.waiting))
        yield self._family(GaugeMetricFamily, "pagedllm:kv_cache_usage_perc", "Fraction of KV blocks in use (0-1)",
                           e.block_manager.usage)
        yield self._family(CounterMetricFamily, "pagedllm:num_preemptions", "Preemptions (recompute)",
                           s.num_preemptions)
        yield self._family(CounterMetricFamily, "pagedllm:prompt_tokens", "Prompt tokens received",
                           e.num_prompt_tokens)
        yield self._family(CounterMetricFamily, "pagedllm:generation_tokens", "Tokens generated", e.num_generation_tokens)
        yield self._family(CounterMetricFamily, "pagedllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                           s.prefix_queries)
        yield self._family(CounterMetricFamily, "pagedllm:prefix_cache_hits", "Prompt tokens found in the prefix cache",
                           s.prefix_hits)


class Metrics:
    def __init__(self, engine: LLMEngine, labels: dict[str, str] | None = None):
        self.registry = CollectorRegistry()
        self.labels = labels or {"model_name": engine.model_config.name or "model"}
        self.registry.register(_EngineCollector(engine, self.labels))
        names = list(self.labels)

        def hist(name: str, doc: str) -> Histogram:
            return Histogram(name, doc, names, buckets=_LATENCY_BUCKETS, registry=self.registry)

        self.ttft = hist("pagedllm:time_to_first_token_seconds", "Time to first token")
        self.tpot = hist("pagedllm:time_per_output_token_seconds", "Mean time per output token after the first")
        self.e2e = hist("pagedllm:e2e_request_latency_seconds", "End-to-end request latency")

    def observe_finished(self, out: RequestOutput) -> None:
        m = out.metrics
        if m is None or m.first_token_time is None:
            return
        values = list(self.labels.values())
        self.ttft.labels(*values).observe(m.first_token_time - m.arrival_time)
        generated = max(len(c.token_ids) for c in out.outputs)
        if generated > 1 and m.last_token_time is not None:
            self.tpot.labels(*values).observe((m.last_token_time - m.first_token_time) / (generated - 1))
        if m.finished_time is not None:
            self.e2e.labels(*values).observe(m.finished_time - m.arrival_time)
