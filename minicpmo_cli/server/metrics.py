"""GET /metrics: Prometheus text with vLLM's names under a ``minicpmo:`` prefix.

Gauges read the pool and the model's LLM engine when scraped (requests running and waiting, KV slots used);
token counters come from the LLM engine's own counts when the model has one, else from the usage of the
answers the server gave; histograms are measured per request by a :class:`RequestTimer` the route starts when
the request arrives (time to first token, time per output token, end-to-end latency, time to first audio,
time waiting for a thread). One registry per server (not prometheus_client's global one), so two apps in a
process (tests) do not collide.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

from fastapi import APIRouter, Request
from fastapi.responses import Response

router = APIRouter()
PREFIX = "minicpmo:"
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    def __init__(self, pool: Callable[[], Any], llm_engine: Callable[[], Any],
                 tts_engine: Callable[[], Any] = lambda: None) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        self._pool, self._llm_engine, self._tts_engine = pool, llm_engine, tts_engine
        self._lock = threading.Lock()
        self.served_prompt_tokens = 0  # from answers' usage: the counters while there is no LLM engine
        self.served_generation_tokens = 0
        histogram = lambda name, doc, buckets=LATENCY_BUCKETS: Histogram(  # noqa: E731
            PREFIX + name, doc, buckets=buckets, registry=self.registry)
        self.ttft = histogram("time_to_first_token_seconds", "Arrival to the first answer token.")
        self.tpot = histogram("time_per_output_token_seconds", "Mean time between answer tokens.", TOKEN_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to the last byte of the answer's content.")
        self.ttfa = histogram("time_to_first_audio_seconds", "Arrival to the first piece of speech.")
        self.queue_time = histogram("request_queue_time_seconds", "Time a request waited for a pool thread.")
        self.finished = Counter(PREFIX + "request_success", "Requests finished, by how.", ["finished_reason"],
                                registry=self.registry)
        self.registry.register(_Live(self))

    # --- the pool's observer -----------------------------------------------------------------------------
    def job_started(self, waited_s: float) -> None:
        self.queue_time.observe(waited_s)

    def job_finished(self, elapsed_s: float, cancelled: bool) -> None:
        pass  # per-request numbers come from RequestTimer, which knows what the job was

    # --- requests ----------------------------------------------------------------------------------------
    def timer(self) -> "RequestTimer":
        return RequestTimer(self)

    def count_served(self, prompt_tokens: int, generation_tokens: int) -> None:
        with self._lock:
            self.served_prompt_tokens += int(prompt_tokens)
            self.served_generation_tokens += int(generation_tokens)

    def exposition(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)

    def engine_stats(self) -> Any:
        engine = self._llm_engine()
        return None if engine is None else engine.stats()

    def pool(self) -> Any:
        return self._pool()

    def tts_stats(self) -> Any:
        engine = self._tts_engine()
        return None if engine is None else engine.snapshot()


class RequestTimer:
    """One request's clock, from its arrival; each mark is recorded once, from whichever thread reaches it."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.arrived = time.monotonic()
        self.first_token_at: float | None = None
        self.first_audio_at: float | None = None
        self.done = False

    def first_token(self) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
            self.metrics.ttft.observe(self.first_token_at - self.arrived)

    def first_audio(self) -> None:
        if self.first_audio_at is None:
            self.first_audio_at = time.monotonic()
            self.metrics.ttfa.observe(self.first_audio_at - self.arrived)

    def finish(self, reason: str, prompt_tokens: int = 0, generation_tokens: int = 0) -> None:
        if self.done:
            return
        self.done = True
        now = time.monotonic()
        self.metrics.e2e.observe(now - self.arrived)
        self.metrics.finished.labels(reason).inc()
        self.metrics.count_served(prompt_tokens, generation_tokens)
        if self.first_token_at is not None and generation_tokens > 1:
            self.metrics.tpot.observe((now - self.first_token_at) / (generation_tokens - 1))


class _Live:
    """Values read when scraped: the pool's and the LLM engine's state and counters."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self):
        return []

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        pool = self.metrics.pool()
        stats = self.metrics.engine_stats()
        running = pool.running if pool is not None else 0
        waiting = pool.waiting if pool is not None else 0
        yield GaugeMetricFamily(PREFIX + "num_requests_running", "Requests a pool thread is working on.",
                                value=running)
        yield GaugeMetricFamily(PREFIX + "num_requests_waiting", "Requests waiting for a pool thread.",
                                value=waiting)
        yield GaugeMetricFamily(PREFIX + "num_pool_threads", "Requests that can run at once (--max-batch).",
                                value=pool.size if pool is not None else 0)
        if stats is not None:
            yield GaugeMetricFamily(PREFIX + "num_engine_requests_running", "Rows the LLM engine decodes.",
                                    value=stats.running)
            yield GaugeMetricFamily(PREFIX + "num_engine_requests_waiting", "Rows waiting for a KV slot.",
                                    value=stats.waiting)
            yield GaugeMetricFamily(PREFIX + "kv_slots_used", "KV cache slots holding a request.",
                                    value=stats.slots_used)
            yield GaugeMetricFamily(PREFIX + "kv_slots_total", "KV cache slots.", value=stats.slots_total)
            yield GaugeMetricFamily(PREFIX + "kv_cache_bytes", "Memory the KV cache slots take.",
                                    value=stats.kv_bytes)
            if stats.kv_budget_bytes is not None:
                yield GaugeMetricFamily(PREFIX + "kv_cache_budget_bytes", "Memory the KV cache slots may take "
                                        "(--kv-cache-gb).", value=stats.kv_budget_bytes)
            prompt, generated = stats.prompt_tokens_total, stats.generation_tokens_total
        else:
            yield GaugeMetricFamily(PREFIX + "kv_slots_used", "KV cache slots holding a request.", value=running)
            prompt, generated = self.metrics.served_prompt_tokens, self.metrics.served_generation_tokens
        yield CounterMetricFamily(PREFIX + "prompt_tokens", "Prompt tokens prefilled.", value=prompt)
        yield CounterMetricFamily(PREFIX + "generation_tokens", "Tokens generated.", value=generated)
        yield from _tts_families(self.metrics.tts_stats())


def _tts_families(stats: Any):
    """The TTS engine's rows, slots and frames (none until a speech request has made the engine)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    if stats is None:
        return
    yield GaugeMetricFamily(PREFIX + "num_tts_rows_running", "Utterances the TTS engine decodes.", value=stats.running)
    yield GaugeMetricFamily(PREFIX + "num_tts_rows_waiting", "Utterances waiting for a TTS slot.", value=stats.waiting)
    yield GaugeMetricFamily(PREFIX + "tts_slots_total", "Slots of the TTS key/value pool.", value=stats.slots_total)
    yield GaugeMetricFamily(PREFIX + "tts_cache_bytes", "Memory the TTS key/value pool takes.", value=stats.pool_bytes)
    yield CounterMetricFamily(PREFIX + "tts_steps", "Batched audio-frame steps run.", value=stats.steps)
    yield CounterMetricFamily(PREFIX + "tts_frames", "Audio frames drawn (4 codes each).", value=stats.frames)


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request):
    from prometheus_client import CONTENT_TYPE_LATEST

    body = request.app.state.minicpmo.metrics.exposition()
    return Response(body, media_type=CONTENT_TYPE_LATEST)
