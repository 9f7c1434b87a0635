"""MetricWriter (triton/metrics.py): custom-metric calls off the engine's event loop.

Triton's ``triton_python_backend_utils`` exists only inside a stub; a fake
module stands in for it here, recording the calls the writer makes.
"""

from __future__ import annotations

import importlib
import sys
import threading
import time
import types

import pytest


class FakeMetric:
    def __init__(self, log: list, name: str, labels: dict):
        self.log, self.key = log, (name, tuple(sorted(labels.items())))

    def increment(self, value):
        self.log.append(("increment", self.key, value))

    def observe(self, value):
        self.log.append(("observe", self.key, value))

    def set(self, value):
        self.log.append(("set", self.key, value))


@pytest.fixture
def metrics(monkeypatch):
    """hetserve.triton.metrics imported against a fake pb_utils; its call log as ``.log``."""
    log: list = []

    class Family:
        COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"

        def __init__(self, name, description, kind):
            self.name = name

        def Metric(self, labels, buckets=None):  # noqa: N802 - pb_utils' name
            return FakeMetric(log, self.name, labels)

    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", types.SimpleNamespace(MetricFamily=Family))
    monkeypatch.delitem(sys.modules, "hetserve.triton.metrics", raising=False)
    module = importlib.import_module("hetserve.triton.metrics")
    module.log = log
    yield module
    sys.modules.pop("hetserve.triton.metrics", None)


def test_updates_are_made_in_order_on_the_writers_thread(metrics):
    writer = metrics.MetricWriter("llm")
    serving = metrics.ServingMetrics("llm", "1", writer)
    threads = []
    writer.submit(lambda: threads.append(threading.current_thread().name))
    serving.prefilled("prefill")
    serving.finished(prompt_tokens=7, generation_tokens=5, n=1, arrival=0.0, first=1.0, end=3.0)
    serving.prefilled("local")
    serving.refused("overloaded")
    writer.close()
    assert threads == ["llm-metrics"]
    calls = [(op, key[0], value) for op, key, value in metrics.log]
    assert calls[0] == ("increment", "hetserve_prefills_total", 1)
    assert calls[1:3] == [("increment", "vllm:prompt_tokens_total", 7), ("increment", "vllm:generation_tokens_total", 5)]
    assert ("observe", "vllm:time_per_output_token_seconds", 0.5) in calls  # (3 - 1) / (5 - 1)
    assert calls[-2:] == [("increment", "hetserve_prefills_total", 1), ("increment", "hetserve_requests_refused_total", 1)]
    assert metrics.log[0][1] != metrics.log[-2][1]  # prefilled_by="prefill" and ="local": two label sets


def test_gauges_keep_their_latest_value_and_are_written_at_most_every_period(metrics):
    writer = metrics.MetricWriter("llm")
    serving = metrics.ServingMetrics("llm", "1", writer)
    for running in range(1, 101):  # 100 admission changes in a burst
        serving.tier("prefill", running, queued=0)
    time.sleep(metrics.GAUGE_PERIOD_S * 6)
    serving.tier("prefill", 0, queued=0)
    writer.close()  # writes what is pending
    sets = [(key[0], value) for op, key, value in metrics.log if op == "set" and key[0] == "hetserve_requests_running"]
    assert sets[-2:] == [("hetserve_requests_running", 100), ("hetserve_requests_running", 0)]  # the burst's last, then 0
    assert len(sets) <= 4  # not 101: coalesced


def test_a_failing_update_does_not_stop_the_others_and_nothing_is_taken_after_close(metrics, caplog):
    writer = metrics.MetricWriter("llm")
    kv = metrics.KVMetrics("llm", writer)
    writer.submit(lambda: 1 / 0)
    kv.record("shm", 4096, (0, 1_000_000), (2_000_000, 3_000_000))
    writer.close()
    assert "a metric update failed" in caplog.text
    assert [(op, key[0]) for op, key, _ in metrics.log] == [
        ("increment", "hetserve_kv_bytes_total"),
        ("observe", "hetserve_kv_scatter_seconds"),
        ("observe", "hetserve_kv_gather_seconds"),
        ("observe", "hetserve_kv_handoff_seconds"),
    ]
    kv.record("shm", 1, None, (0, 1))
    time.sleep(0.05)
    assert len(metrics.log) == 4
