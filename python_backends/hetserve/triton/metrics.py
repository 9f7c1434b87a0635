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
