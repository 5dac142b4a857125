"""Prometheus ``GET /metrics`` (``prometheus_client``), every name in the ``dmax_`` namespace.

Why these: an operator sizing a DMax server needs what a token server shows (running / queued
requests, finished ones by reason, prompt and generated tokens, time to the first committed block —
DMax's "first token" —, end-to-end latency) plus what is DMax's own: model forwards per request
(NFE) and tokens per forward, engine rounds and the compile count (flat after warm-up: a rising
count means requests are recompiling), and the prefix cache's hits, misses, evictions and bytes.
Each app has its own registry, so several servers in one
process (the tests) never collide; engine gauges are read at scrape time from ``Engine.stats``.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from typing import Any

from fastapi import FastAPI
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from dmax_jax.serving.requests import Finished

NS = "dmax"
_SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_NFE = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
_TPF = (0.5, 1, 1.5, 2, 3, 4, 6, 8, 12, 16, 24, 32)


class _EngineCollector(Collector):
    """The engine's own counters, read when scraped (no bookkeeping on the hot path)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Any]:
        s = collections.defaultdict(int, self.engine.stats())
        yield GaugeMetricFamily(f"{NS}_requests_running", "Requests in a slot (prefilling or decoding)",
                                value=s["prefilling"] + s["decoding"])
        yield GaugeMetricFamily(f"{NS}_requests_queued", "Requests waiting for a slot", value=s["queued"])
        yield GaugeMetricFamily(f"{NS}_slots_free", "Free engine slots", value=s["free_slots"])
        yield CounterMetricFamily(f"{NS}_engine_rounds", "Engine rounds run (one program call each)",
                                  value=s["rounds"])
        yield CounterMetricFamily(f"{NS}_engine_forwards", "Model forwards run one after another",
                                  value=s["forwards"])
        yield CounterMetricFamily(f"{NS}_engine_blocks", "Blocks committed", value=s["blocks"])
        yield GaugeMetricFamily(f"{NS}_engine_compiles", "Compiled engine programs (flat after warm-up)",
                                value=s["compile_count"])
        for name, doc in (("hits", "Admitted requests that reused cached prompt blocks"),
                          ("misses", "Admitted requests that found no cached prompt block"),
                          ("hit_blocks", "Prompt blocks served from the prefix cache (prefill skipped)"),
                          ("inserted_blocks", "Committed blocks saved into the prefix cache"),
                          ("evictions", "Prefix cache blocks evicted (least recently used) for new ones")):
            yield CounterMetricFamily(f"{NS}_prefix_cache_{name}", doc, value=s[f"prefix_cache_{name}"])
        yield GaugeMetricFamily(f"{NS}_prefix_cache_bytes", "Device bytes of the cached blocks",
                                value=s["prefix_cache_bytes"])
        yield GaugeMetricFamily(f"{NS}_prefix_cache_capacity_bytes", "Device bytes of the prefix cache's "
                                "pool (its budget)", value=s["prefix_cache_capacity_bytes"])


class Metrics:
    """The server's metrics; :meth:`first_block` and :meth:`finished` are called from the engine
    thread (``prometheus_client`` is thread-safe)."""

    def __init__(self, engine: Any) -> None:
        self.registry = r = CollectorRegistry()
        r.register(_EngineCollector(engine))
        self.requests_finished = Counter(f"{NS}_requests_finished", "Finished engine requests (one per "
                                         "choice) by reason: eos, length, stop, abort, error", ["reason"],
                                         registry=r)
        self.prompt_tokens = Counter(f"{NS}_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter(f"{NS}_generation_tokens", "Generated tokens returned", registry=r)
        self.nfe = Histogram(f"{NS}_request_nfe", "Model forwards per request (NFE, prefill included)",
                             buckets=_NFE, registry=r)
        self.tpf = Histogram(f"{NS}_request_tokens_per_forward", "Tokens per forward (TPF) per request",
                             buckets=_TPF, registry=r)
        self.ttfb = Histogram(f"{NS}_time_to_first_block_seconds", "Submit to the first committed block",
                              buckets=_SECONDS, registry=r)
        self.latency = Histogram(f"{NS}_request_latency_seconds", "Submit to finished (end to end)",
                                 buckets=_SECONDS, registry=r)

    def first_block(self, seconds: float) -> None:
        self.ttfb.observe(seconds)

    def finished(self, ev: Finished, seconds: float) -> None:
        self.requests_finished.labels(reason=ev.reason).inc()
        self.prompt_tokens.inc(ev.usage.prompt_tokens)
        self.generation_tokens.inc(len(ev.token_ids))
        self.latency.observe(seconds)
        if ev.usage.nfe:
            self.nfe.observe(ev.usage.nfe)
            self.tpf.observe(ev.usage.tpf)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def add_metrics_route(app: FastAPI, metrics: Metrics) -> None:
    @app.get("/metrics")
    async def prometheus() -> Response:
        """Prometheus text exposition of :class:`Metrics`."""
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)
