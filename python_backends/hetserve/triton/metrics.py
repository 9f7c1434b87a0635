"""Metrics on Triton's metrics port (python backend custom metrics).

KV hand-off: histograms of the three stages of a hand-off — the producer's
gather (paged cache → slot), the whole hand-off (gather start → the
consumer's scatter end, engine compute excluded) and the consumer's scatter
(slot → paged cache) — and a counter of KV bytes moved, labelled by model and
transport. Serving: per-request metrics under Triton's vLLM backend names.

Every update goes through a MetricWriter, on a thread of its own: each
custom-metric call is a round trip to the server, which the engine's event
loop waited for. ``increment`` and ``observe`` release the GIL meanwhile, so
on the writer's thread they no longer hold up the loop; ``Metric.set`` holds
the GIL through its round trip (Triton 2.51) wherever it runs, so gauges are
coalesced to their latest value and written at most every GAUGE_PERIOD_S
(set at every admission change, on the loop, they took 38% of its
GIL-holding samples under 64 requests, py-spy ``--gil``). As in Triton's
vLLM backend, the loop only queues updates; a scrape can lag a request's
last response by the writer's turn (milliseconds; gauges up to
GAUGE_PERIOD_S).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Callable

import triton_python_backend_utils as pb_utils

logger = logging.getLogger(__name__)

GAUGE_PERIOD_S = 0.25  # gauges keep their latest value and are written at most this often


def _set(metric: Callable[[], object], value: float) -> None:
    gauge = metric()
    if gauge is not None:  # None: closed
        gauge.set(value)


class MetricWriter:
    """Custom-metric calls, made in order on one thread; gauges coalesced to their latest value."""

    def __init__(self, name: str):
        self._name = name
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._gauges: dict[object, tuple[float, Callable[[], object]]] = {}  # key -> (latest value, its metric or None)
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"{name}-metrics", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable, *args) -> None:
        """Call ``fn(*args)`` on the writer's thread, after what was submitted before."""
        if not self._closed:
            self._queue.put((fn, args))

    def gauge(self, key: object, value: float, metric: Callable[[], object]) -> None:
        """Set the gauge ``metric()`` (named by ``key``) to ``value``, at the writer's next gauge turn."""
        with self._lock:
            self._gauges[key] = (value, metric)

    def _write_gauges(self) -> None:
        with self._lock:
            gauges, self._gauges = self._gauges, {}
        for value, metric in gauges.values():
            self._call(_set, metric, value)

    def _call(self, fn: Callable, *args) -> None:
        try:
            fn(*args)
        except Exception:  # noqa: BLE001 - a metric is not worth a request; keep writing the others
            logger.exception("%s: a metric update failed", self._name)

    def _run(self) -> None:
        next_gauges = time.monotonic()
        while True:
            wait = max(0.0, next_gauges - time.monotonic()) if self._gauges else GAUGE_PERIOD_S
            try:
                item = self._queue.get(timeout=wait)
            except queue.Empty:
                item = ()
            if item is None:
                break
            if item:
                self._call(item[0], *item[1])
            if self._gauges and time.monotonic() >= next_gauges:
                self._write_gauges()
                next_gauges = time.monotonic() + GAUGE_PERIOD_S
        self._write_gauges()

    def close(self, timeout_s: float = 5.0) -> None:
        """Write what is queued, then stop (before the metrics are freed); nothing is taken after."""
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            logger.warning("%s: the metrics writer did not finish in %.0f s", self._name, timeout_s)

BUCKETS_S = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0]
GATHER = "hetserve_kv_gather_seconds"
HANDOFF = "hetserve_kv_handoff_seconds"
SCATTER = "hetserve_kv_scatter_seconds"
BYTES = "hetserve_kv_bytes_total"


class KVMetrics:
    def __init__(self, model: str, writer: MetricWriter):
        self._model = model
        self._writer = writer
        histogram = pb_utils.MetricFamily.HISTOGRAM
        self._families = {
            GATHER: pb_utils.MetricFamily(name=GATHER, description="KV gather time (paged cache to slot)", kind=histogram),
            HANDOFF: pb_utils.MetricFamily(
                name=HANDOFF, description="KV hand-off time, gather start to scatter end", kind=histogram
            ),
            SCATTER: pb_utils.MetricFamily(name=SCATTER, description="KV scatter time (slot to paged cache)", kind=histogram),
            BYTES: pb_utils.MetricFamily(name=BYTES, description="KV bytes moved", kind=pb_utils.MetricFamily.COUNTER),
        }
        self._metrics: dict[tuple[str, str], object] = {}

    def close(self) -> None:
        """Free the metrics while the stub can still talk to the server (after the writer's close).

        A MetricFamily destroyed at interpreter exit segfaults the stub
        (Metric::Clear writes to shared memory that is gone).
        """
        self._metrics.clear()
        self._families.clear()

    def _metric(self, name: str, transport: str):
        key = (name, transport)
        if key not in self._metrics:
            labels = {"model": self._model, "transport": transport}
            family = self._families[name]
            self._metrics[key] = (
                family.Metric(labels=labels) if name == BYTES else family.Metric(labels=labels, buckets=BUCKETS_S)
            )
        return self._metrics[key]

    def record(self, transport: str, nbytes: int, gather_ns: tuple[int, int] | None, scatter_ns: tuple[int, int]) -> None:
        """One hand-off; times are CLOCK_MONOTONIC (start, end) pairs in ns."""
        self._writer.submit(self._record, transport, nbytes, gather_ns, scatter_ns)

    def _record(self, transport: str, nbytes: int, gather_ns: tuple[int, int] | None, scatter_ns: tuple[int, int]) -> None:
        if not self._families:
            return  # closed
        self._metric(BYTES, transport).increment(nbytes)
        self._metric(SCATTER, transport).observe((scatter_ns[1] - scatter_ns[0]) / 1e9)
        if gather_ns is not None:
            self._metric(GATHER, transport).observe((gather_ns[1] - gather_ns[0]) / 1e9)
            self._metric(HANDOFF, transport).observe((scatter_ns[1] - gather_ns[0]) / 1e9)


LATENCY_BUCKETS_S = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0]
TOKEN_BUCKETS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000]
N_BUCKETS = [1, 2, 5, 10, 20]


class ServingMetrics:
    """Per-request serving metrics of a model, under Triton's vLLM backend names.

    ``vllm:*`` where the meaning is the one of Triton's vLLM backend (labels
    ``model`` and ``version``), recorded once per finished request: a custom
    metric update is a round trip to the server, too dear per token. So
    ``vllm:time_per_output_token_seconds`` gets one observation per request,
    its mean gap between tokens after the first. ``hetserve_*`` for what the
    split adds: where each prompt was prefilled, requests refused and why,
    requests running and queued per tier. Every method only queues the update
    on ``writer``.
    """

    def __init__(self, model: str, version: str, writer: MetricWriter):
        self._labels = {"model": model, "version": version}
        self._writer = writer
        family = pb_utils.MetricFamily
        self._families: dict[str, object] = {}  # one per name; a Metric per label set

        def make(name: str, description: str, kind, buckets=None, **labels):
            if name not in self._families:
                self._families[name] = pb_utils.MetricFamily(name=name, description=description, kind=kind)
            labels = {**self._labels, **labels}
            fam = self._families[name]
            return fam.Metric(labels=labels, buckets=buckets) if buckets else fam.Metric(labels=labels)

        self._make = make
        self.prompt_tokens = make("vllm:prompt_tokens_total", "Number of prefill tokens processed.", family.COUNTER)
        self.generation_tokens = make("vllm:generation_tokens_total", "Number of generation tokens processed.", family.COUNTER)
        self.ttft = make("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", family.HISTOGRAM, LATENCY_BUCKETS_S)
        self.tpot = make(
            "vllm:time_per_output_token_seconds", "Histogram of time per output token in seconds (one mean per request).",
            family.HISTOGRAM, LATENCY_BUCKETS_S,
        )
        self.e2e = make("vllm:e2e_request_latency_seconds", "Histogram of end to end request latency in seconds.", family.HISTOGRAM, LATENCY_BUCKETS_S)
        self.request_prompt = make("vllm:request_prompt_tokens", "Number of prefill tokens processed.", family.HISTOGRAM, TOKEN_BUCKETS)
        self.request_generation = make(
            "vllm:request_generation_tokens", "Number of generation tokens processed.", family.HISTOGRAM, TOKEN_BUCKETS
        )
        self.params_n = make("vllm:request_params_n", "Histogram of the n request parameter.", family.HISTOGRAM, N_BUCKETS)
        self._by_label: dict[tuple[str, str], object] = {}
        self.closed = False

    def _labelled(self, name: str, description: str, kind, key: str, value: str):
        """The metric ``name`` with one more label (made on first use, on the writer's thread)."""
        if (name, value) not in self._by_label:
            self._by_label[(name, value)] = self._make(name, description, kind, **{key: value})
        return self._by_label[(name, value)]

    def finished(self, prompt_tokens: int, generation_tokens: int, n: int, arrival: float, first: float | None, end: float) -> None:
        """A request that completed; times from time.monotonic()."""
        self._writer.submit(self._finished, prompt_tokens, generation_tokens, n, arrival, first, end)

    def _finished(self, prompt_tokens: int, generation_tokens: int, n: int, arrival: float, first: float | None, end: float) -> None:
        if self.closed:
            return
        self.prompt_tokens.increment(prompt_tokens)
        self.generation_tokens.increment(generation_tokens)
        self.request_prompt.observe(prompt_tokens)
        self.request_generation.observe(generation_tokens)
        self.params_n.observe(n)
        self.e2e.observe(end - arrival)
        if first is not None:
            self.ttft.observe(first - arrival)
            if generation_tokens > 1:
                self.tpot.observe((end - first) / (generation_tokens - 1))

    def _count(self, name: str, description: str, key: str, value: str) -> None:
        if not self.closed:
            self._labelled(name, description, pb_utils.MetricFamily.COUNTER, key, value).increment(1)

    def prefilled(self, where: str) -> None:
        """Where a prompt was prefilled: ``local`` or the prefill tier's model name."""
        self._writer.submit(self._count, "hetserve_prefills_total", "Prompts prefilled, by where", "prefilled_by", where)

    def refused(self, reason: str) -> None:
        self._writer.submit(
            self._count, "hetserve_requests_refused_total", "Requests ended by a limit (overloaded, timed_out)", "reason", reason,
        )

    def tier(self, tier: str, running: int, queued: int) -> None:
        """Requests in flight and queued at a tier's admission (this model itself, or a prefill tier)."""
        for name, description, value in (
            ("hetserve_requests_running", "Requests admitted and in flight, per tier", running),
            ("hetserve_requests_waiting", "Requests queued for admission, per tier", queued),
        ):
            self._writer.gauge((name, tier), value, lambda name=name, description=description: self._gauge(name, description, tier))

    def _gauge(self, name: str, description: str, tier: str):
        if self.closed:
            return None
        return self._labelled(name, description, pb_utils.MetricFamily.GAUGE, "tier", tier)

    def close(self) -> None:
        """As KVMetrics.close (after the writer's close): free them while the stub can still talk to the server."""
        self.closed = True
        self._by_label.clear()
        self._families.clear()
        for name in ("prompt_tokens", "generation_tokens", "ttft", "tpot", "e2e", "request_prompt", "request_generation", "params_n", "_make"):
            setattr(self, name, None)

