"""Prometheus metrics: engine gauges read at scrape time, latency histograms fed per request.

Engine state is sampled when /metrics is scraped (no bookkeeping on the hot path); latencies
come from each RequestOutput's monotonic timestamps. Each app has its own registry so several
servers (tests) can live in one process.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pagoda.engine.async_engine import AsyncEngine
from pagoda.engine.outputs import RequestOutput

log = logging.getLogger("pagoda.server")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                    80.0, 160.0, 640.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)


class _EngineCollector(Collector):
    """Gauges and counters straight from ``AsyncEngine.stats()``."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        s = self.engine.stats()
        prompt_total = s.prompt_tokens_computed + s.prompt_tokens_cached
        gauges = {
            "pagoda_num_requests_running": ("sequences being prefilled or decoded", s.num_running),
            "pagoda_num_requests_waiting": ("sequences queued for a slot", s.num_waiting),
            "pagoda_num_requests_in_flight": ("requests the server is streaming", self.engine.num_in_flight),
            "pagoda_kv_cache_usage_perc": ("fraction of KV-cache pages in use (1 = full)", s.kv_usage),
            "pagoda_kv_cache_free_pages": ("KV-cache pages free", s.kv_pages_free),
            "pagoda_kv_cache_total_pages": ("KV-cache pages in all", s.kv_pages_total),
            "pagoda_kv_cache_cached_pages": ("pages held by the prefix cache", s.kv_pages_cached),
            "pagoda_spec_decode_acceptance_rate": (
                "speculative decoding: fraction of proposed tokens the target accepted", s.spec_acceptance_rate,
            ),
            "pagoda_spec_decode_mean_acceptance_length": (
                "speculative decoding: tokens per verification (accepted proposals + the target's own)",
                s.spec_mean_acceptance_length,
            ),
            "pagoda_prefix_cache_hit_rate": (
                "fraction of prompt tokens served from the prefix cache", s.prompt_tokens_cached / prompt_total
                if prompt_total else 0.0,
            ),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(name, doc, value=float(value))
        counters = {
            "pagoda_prompt_tokens": ("prompt tokens processed (computed + cached)", prompt_total),
            "pagoda_prompt_tokens_cached": ("prompt tokens served from the prefix cache", s.prompt_tokens_cached),
            "pagoda_generation_tokens": ("tokens generated", s.generation_tokens),
            "pagoda_num_preemptions": ("sequences preempted for lack of KV pages", s.num_preemptions),
            "pagoda_spec_decode_num_draft_tokens": ("speculative decoding: tokens proposed and verified",
                                                    s.spec_num_draft_tokens),
            "pagoda_spec_decode_num_accepted_tokens": ("speculative decoding: proposed tokens the target accepted",
                                                       s.spec_num_accepted_tokens),
            "pagoda_spec_decode_num_drafts": ("speculative decoding: verifications (sequence-steps that speculated)",
                                              s.spec_num_steps),
        }
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(name, doc, value=float(value))


class ServerMetrics:
    def __init__(self, engine: AsyncEngine) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(engine))
        r = self.registry
        self.ttft = Histogram("pagoda_time_to_first_token_seconds", "arrival to first generated token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("pagoda_inter_token_latency_seconds", "time between streamed outputs of a request",
                             buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram("pagoda_e2e_request_latency_seconds", "arrival to the last token",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.finished = Counter("pagoda_request_finished", "finished sequences by finish reason",
                                ["finish_reason"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def tracker(self, request_id: str) -> RequestTracker:
        return RequestTracker(self, request_id)


class RequestTracker:
    """Follows one request's outputs: inter-token gaps, then TTFT, E2E, the finish counter and a log line."""

    def __init__(self, metrics: ServerMetrics, request_id: str) -> None:
        self.metrics, self.request_id = metrics, request_id
        self.start = time.monotonic()
        self.last: float | None = None
        self.latest: RequestOutput | None = None
        self.done = False

    def on_output(self, output: RequestOutput) -> None:
        now = time.monotonic()
        self.latest = output
        if any(c.delta_token_ids for c in output.outputs):
            if self.last is not None:
                self.metrics.itl.observe(now - self.last)
            self.last = now
        if output.finished or all(c.finish_reason is not None for c in output.outputs):
            self.finish(output)

    def abandon(self) -> None:
        """The client left (or the stream failed) before the final output: count and log an abort."""
        if self.done:
            return
        self.done = True
        self.metrics.finished.labels(finish_reason="abort").inc()
        out = self.latest
        prompt = len(out.prompt_token_ids) if out else 0
        completion = sum(len(c.token_ids) for c in out.outputs) if out else 0
        log.info("%s aborted (client gone): %d prompt + %d completion tokens in %.3fs", self.request_id, prompt,
                 completion, time.monotonic() - self.start)

    def finish(self, output: RequestOutput) -> None:
        if self.done:
            return
        self.done = True
        m, now = output.metrics, time.monotonic()
        arrival = m.arrival_time if m is not None else self.start
        if m is not None and m.first_token_time is not None:
            self.metrics.ttft.observe(max(0.0, m.first_token_time - arrival))
        latency = max(0.0, (m.finish_time if m is not None and m.finish_time else now) - arrival)
        self.metrics.e2e.observe(latency)
        reasons = []
        for choice in output.outputs:
            reason = choice.finish_reason or "abort"
            self.metrics.finished.labels(finish_reason=reason).inc()
            reasons.append(reason)
        completion = sum(len(c.token_ids) for c in output.outputs)
        log.info("%s finished (%s): %d prompt + %d completion tokens in %.3fs", self.request_id,
                 ",".join(sorted(set(reasons))), len(output.prompt_token_ids), completion, latency)
