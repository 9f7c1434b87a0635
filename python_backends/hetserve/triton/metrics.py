"""KV hand-off metrics on Triton's metrics port (python backend custom metrics).

Histograms of the three stages of a hand-off — the producer's gather (paged
cache → slot), the whole hand-off (gather start → the consumer's scatter end,
engine compute excluded) and the consumer's scatter (slot → paged cache) —
and a counter of KV bytes moved, labelled by model and transport.
"""

from __future__ import annotations

import triton_python_backend_utils as pb_utils

BUCKETS_S = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0]
GATHER = "hetserve_kv_gather_seconds"
HANDOFF = "hetserve_kv_handoff_seconds"
SCATTER = "hetserve_kv_scatter_seconds"
BYTES = "hetserve_kv_bytes_total"


class KVMetrics:
    def __init__(self, model: str):
        self._model = model
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
        """Free the metrics while the stub can still talk to the server.

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
    requests running and queued per tier.
    """

    def __init__(self, model: str, version: str):
        self._labels = {"model": model, "version": version}
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
        if (name, value) not in self._by_label:
            self._by_label[(name, value)] = self._make(name, description, kind, **{key: value})
        return self._by_label[(name, value)]

    def finished(self, prompt_tokens: int, generation_tokens: int, n: int, arrival: float, first: float | None, end: float) -> None:
        """A request that completed; times from time.monotonic()."""
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

    def prefilled(self, where: str) -> None:
        """Where a prompt was prefilled: ``local`` or the prefill tier's model name."""
        if self.closed:
            return
        self._labelled("hetserve_prefills_total", "Prompts prefilled, by where", pb_utils.MetricFamily.COUNTER, "prefilled_by", where).increment(1)

    def refused(self, reason: str) -> None:
        if self.closed:
            return
        self._labelled(
            "hetserve_requests_refused_total", "Requests ended by a limit (overloaded, timed_out)",
            pb_utils.MetricFamily.COUNTER, "reason", reason,
        ).increment(1)

    def tier(self, tier: str, running: int, queued: int) -> None:
        """Requests in flight and queued at a tier's admission (this model itself, or a prefill tier)."""
        if self.closed:
            return
        gauge = pb_utils.MetricFamily.GAUGE
        self._labelled("hetserve_requests_running", "Requests admitted and in flight, per tier", gauge, "tier", tier).set(running)
        self._labelled("hetserve_requests_waiting", "Requests queued for admission, per tier", gauge, "tier", tier).set(queued)

    def close(self) -> None:
        """As KVMetrics.close: free them while the stub can still talk to the server; record nothing after."""
        self.closed = True
        self._by_label.clear()
        self._families.clear()
        for name in ("prompt_tokens", "generation_tokens", "ttft", "tpot", "e2e", "request_prompt", "request_generation", "params_n", "_make"):
            setattr(self, name, None)
