"""Prometheus metrics with vLLM's names and labels, so its dashboards, autoscaling rules and routers read them.

The namespace is `vllm:` by default: a deployment that swaps vLLM for pagedllm keeps its Grafana dashboard, KEDA /
HPA rules and llm-d-style routers unchanged; `--metrics-namespace pagedllm` gives `pagedllm:` names instead. The
`model_name` label is the served model name, as in vLLM. Gauges and counters are read from the engine at scrape
time (no bookkeeping on the hot path); latency histograms are observed once per finished request.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from pagedllm.outputs import RequestOutput

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)


_GAUGES = {
    "num_running": ("num_requests_running", "Sequences in the running batch"),
    "num_waiting": ("num_requests_waiting", "Sequences waiting to be scheduled"),
    "kv_cache_usage": ("kv_cache_usage_perc", "Fraction of KV blocks in use (0-1)"),
}
_COUNTERS = {
    "num_preemptions": ("num_preemptions", "Preemptions (recompute)"),
    "prompt_tokens": ("prompt_tokens", "Prompt tokens received"),
    "generation_tokens": ("generation_tokens", "Tokens generated"),
    "prefix_cache_queries": ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache"),
    "prefix_cache_hits": ("prefix_cache_hits", "Prompt tokens found in the prefix cache"),
    "spec_decode_num_drafts": ("spec_decode_num_drafts", "Sequence steps that verified speculative proposals"),
    "spec_decode_num_draft_tokens": ("spec_decode_num_draft_tokens", "Speculative tokens proposed"),
    "spec_decode_num_accepted_tokens": ("spec_decode_num_accepted_tokens", "Speculative tokens accepted"),
}


class _EngineCollector:
    """Reads engine.stats() at scrape time: one sample per replica (labelled) per metric."""

    def __init__(self, engine, labels: dict[str, str], namespace: str):
        self.engine, self.labels, self.namespace = engine, labels, namespace

    def collect(self):
        fractions = getattr(getattr(self.engine, "executor", None), "busy_fractions", None)
        if fractions is not None:
            fam = GaugeMetricFamily(f"{self.namespace}:pipeline_stage_busy_fraction",
                                    "Busy time over wall time per pipeline stage (1 - bubble fraction)",
                                    labels=[*self.labels, "stage"])
            for stage, value in enumerate(fractions()):
                fam.add_metric([*self.labels.values(), str(stage)], value)
            yield fam
        snapshot = self.engine.stats()
        for kinds, cls in ((_GAUGES, GaugeMetricFamily), (_COUNTERS, CounterMetricFamily)):
            for field, (name, doc) in kinds.items():
                fam = None
                for extra, stats in snapshot:
                    labels = {**self.labels, **extra}
                    fam = fam or cls(f"{self.namespace}:{name}", doc, labels=list(labels))
                    fam.add_metric(list(labels.values()), getattr(stats, field))
                if fam is not None:
                    yield fam


NAMESPACES = ("vllm", "pagedllm")


class Metrics:
    def __init__(self, engine, model_name: str, namespace: str = "vllm"):
        self.registry = CollectorRegistry()
        self.labels = {"model_name": model_name}
        self.registry.register(_EngineCollector(engine, self.labels, namespace))
        names = list(self.labels)

        def hist(name: str, doc: str, buckets=_LATENCY_BUCKETS) -> Histogram:
            return Histogram(f"{namespace}:{name}", doc, names, buckets=buckets, registry=self.registry)

        self.ttft = hist("time_to_first_token_seconds", "Time to first token")
        self.tpot = hist("time_per_output_token_seconds", "Mean time per output token after the first")
        self.e2e = hist("e2e_request_latency_seconds", "End-to-end request latency")
        self.queue = hist("request_queue_time_seconds", "Time from arrival to first scheduled")
        self.prefill = hist("request_prefill_time_seconds", "Time from first scheduled to first token")
        self.decode = hist("request_decode_time_seconds", "Time from first token to last token")
        self.prompt_tokens = hist("request_prompt_tokens", "Prompt tokens per request", _TOKEN_BUCKETS)
        self.generation_tokens = hist("request_generation_tokens", "Tokens generated per request (all samples)",
                                      _TOKEN_BUCKETS)
        self.success = Counter(f"{namespace}:request_success", "Finished requests by the reason their first sample ended",
                               [*names, "finished_reason"], registry=self.registry)

    def observe_finished(self, out: RequestOutput) -> None:
        values = list(self.labels.values())
        self.success.labels(*values, out.outputs[0].finish_reason if out.outputs else "error").inc()
        self.prompt_tokens.labels(*values).observe(len(out.prompt_token_ids))
        self.generation_tokens.labels(*values).observe(sum(len(c.token_ids) for c in out.outputs))
        m = out.metrics
        if m is None:
            return
        if m.first_scheduled_time is not None:
            self.queue.labels(*values).observe(m.first_scheduled_time - m.arrival_time)
        if m.first_token_time is None:
            return
        self.ttft.labels(*values).observe(m.first_token_time - m.arrival_time)
        if m.first_scheduled_time is not None:
            self.prefill.labels(*values).observe(m.first_token_time - m.first_scheduled_time)
        generated = max(len(c.token_ids) for c in out.outputs)
        if generated > 1 and m.last_token_time is not None:
            self.tpot.labels(*values).observe((m.last_token_time - m.first_token_time) / (generated - 1))
            self.decode.labels(*values).observe(m.last_token_time - m.first_token_time)
        if m.finished_time is not None:
            self.e2e.labels(*values).observe(m.finished_time - m.arrival_time)
