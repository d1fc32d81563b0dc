"""Prometheus metrics of one server (`GET /metrics`), named like vLLM's with an `ascend_v4:` prefix.

Per-request series are recorded by the serving layer: HTTP responses by route and status, finished
requests by finish reason, client disconnects, and TTFT / TPOT / end-to-end latency histograms (measured
from the request's arrival, so queueing counts in TTFT). Engine state is read at scrape time from
`AsyncEngine.stats()` / `health()`: queue depth, running sequences, cache blocks and usage, prefix-cache
hit rate, prompt / generation token totals, preemptions and aborted requests, and speculative decoding's
drafts, draft and accepted tokens (per chain position too) and draft time. Each app has its own
registry, so several servers can live in one process (tests).
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
P = "ascend_v4:"

TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0, 160.0, 640.0)
TPOT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
                20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0)


class _EngineCollector:
    """Engine gauges and counters, read from the engine when scraped."""

    def __init__(self, stats: Callable[[], dict], health: Callable[[], dict]):
        self._stats, self._health = stats, health

    def collect(self):
        s = self._stats()
        gauges = {
            "num_requests_waiting": ("requests waiting to be scheduled (queue depth)", s.get("waiting", 0)),
            "num_requests_running": ("sequences in the running batch", s.get("running", 0)),
            "num_requests_in_flight": ("requests submitted and not finished", s.get("in_flight", 0)),
            "kv_cache_usage_perc": ("fraction of cache blocks in use (0..1)", s.get("cache_usage", 0.0)),
            "cache_blocks_used": ("cache blocks in use", s.get("blocks_used", 0)),
            "cache_blocks_total": ("cache blocks in all", s.get("blocks_total", 0)),
            "prefix_cache_hit_rate": ("prefix-cache hit rate (0..1)", s.get("prefix_hit_rate", 0.0)),
            "engine_healthy": ("1 when the engine is healthy", 1.0 if self._health().get("healthy") else 0.0),
        }
        for name, (doc, value) in gauges.items():
            g = GaugeMetricFamily(P + name, doc)
            g.add_metric([], float(value))
            yield g
        counters = {
            "prompt_tokens": ("prompt tokens admitted to the engine", "prompt_tokens"),
            "generation_tokens": ("tokens generated", "generation_tokens"),
            "num_preemptions": ("sequences preempted (recomputed later)", "preemptions"),
            "request_aborted": ("requests aborted (client disconnects included)", "aborted"),
            "engine_steps": ("engine steps run", "steps"),
            # speculative decoding (MTP / DSpark), vLLM's spec_decode_* names
            "spec_decode_num_drafts": ("draft chains verified (one per request and step)", "spec_verify_steps"),
            "spec_decode_num_draft_tokens": ("draft tokens verified", "spec_proposed"),
            "spec_decode_num_accepted_tokens": ("draft tokens accepted", "spec_accepted"),
            "spec_decode_draft_seconds": ("seconds spent in draft forwards", "spec_draft_seconds"),
        }
        for name, (doc, key) in counters.items():
            c = CounterMetricFamily(P + name, doc)
            c.add_metric([], float(s.get(key, 0)))
            yield c
        c = CounterMetricFamily(P + "spec_decode_num_accepted_tokens_per_pos",
                                "draft tokens accepted at each chain position", labels=["position"])
        for j, n in enumerate(s.get("spec_position_accepted", [])):
            c.add_metric([str(j)], float(n))
        yield c


class ServerMetrics:
    def __init__(self, stats: Callable[[], dict], health: Callable[[], dict]):
        # Ledger: process-wide switch of prometheus_client (drops the `*_created` series, as vLLM does).
        disable_created_metrics()
        self.registry = r = CollectorRegistry()
        self.http = Counter(P + "http_requests", "HTTP responses by route and status code",
                            ["route", "status"], registry=r)
        self.finished = Counter(P + "request_success", "requests finished, by finish reason",
                                ["finished_reason"], registry=r)
        self.disconnects = Counter(P + "client_disconnects", "requests whose client went away before the end",
                                   registry=r)
        self.ttft = Histogram(P + "time_to_first_token_seconds", "arrival to first generated token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram(P + "time_per_output_token_seconds",
                              "mean time per output token after the first, per request",
                              buckets=TPOT_BUCKETS, registry=r)
        self.e2e = Histogram(P + "e2e_request_latency_seconds", "arrival to last token", buckets=E2E_BUCKETS,
                             registry=r)
        r.register(_EngineCollector(stats, health))

    def observe_request(self, reason: str, arrival: float, first_token: float | None, end: float,
                        output_tokens: int) -> None:
        """One engine request ended (`reason`: stop / length / abort / error / disconnect)."""
        self.finished.labels(reason).inc()
        if reason == "disconnect":
            self.disconnects.inc()
        if first_token is not None:
            self.ttft.observe(first_token - arrival)
            if output_tokens > 1:
                self.tpot.observe((end - first_token) / (output_tokens - 1))
        self.e2e.observe(end - arrival)

    def observe_http(self, route: str, status: int) -> None:
        self.http.labels(route, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
