"""Serving metrics on the metrics port move by exactly the traffic sent.

Triton's vLLM backend names (``vllm:*``, labelled model and version) for what
means the same, ``hetserve_*`` for where prompts were prefilled and the
admission gauges.
"""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor

from hetserve_client import stream_grpc

PROMPTS = ["Hello", "model token " * 40, "Simple is better than complex. " * 12]
GREEDY = {"max_tokens": 10, "temperature": 0, "ignore_eos": True}
LINE = re.compile(r'([^{\s]+)(?:\{(.*)\})?$')


def samples(server) -> dict[tuple[str, frozenset], float]:
    out = {}
    for key, value in server.metrics().items():
        name, labels = LINE.match(key).groups()
        pairs = frozenset(re.findall(r'(\w+)="([^"]*)"', labels or ""))
        out[(name, pairs)] = value
    return out


def value(found, name, **labels) -> float:
    want = frozenset({("model", "llm"), ("version", "1"), *labels.items()})
    return found.get((name, want), 0.0)


def test_counters_move_by_the_traffic_sent(server, reference):
    expected = reference(PROMPTS, GREEDY)
    prompt_tokens = [len(e["prompt_token_ids"]) for e in expected]
    assert min(prompt_tokens) < 32 <= max(prompt_tokens)  # both routes
    remote = sum(n >= 32 for n in prompt_tokens)
    before = samples(server)
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        outputs = list(pool.map(lambda p: [t for d in stream_grpc(server.grpc_url, p, GREEDY) for t in d.token_ids], PROMPTS))
    assert outputs == [e["token_ids"] for e in expected]
    after = samples(server)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("vllm:prompt_tokens_total") == sum(prompt_tokens)
    assert delta("vllm:generation_tokens_total") == 10 * len(PROMPTS)
    for histogram in (
        "vllm:time_to_first_token_seconds", "vllm:time_per_output_token_seconds", "vllm:e2e_request_latency_seconds",
        "vllm:request_prompt_tokens", "vllm:request_generation_tokens", "vllm:request_params_n",
    ):
        assert delta(histogram + "_count") == len(PROMPTS), histogram
    assert delta("vllm:request_prompt_tokens_sum") == sum(prompt_tokens)
    assert delta("vllm:request_params_n_sum") == len(PROMPTS)
    assert 0 < delta("vllm:time_to_first_token_seconds_sum") <= delta("vllm:e2e_request_latency_seconds_sum")
    assert delta("hetserve_prefills_total", prefilled_by="prefill") == remote
    assert delta("hetserve_prefills_total", prefilled_by="local") == len(PROMPTS) - remote
    # Nothing is left running or queued, at llm's admission or prefill's. A
    # request leaves admission just after its final response is sent, and
    # gauges are written every GAUGE_PERIOD_S: allow it a few seconds.
    deadline = time.monotonic() + 10
    while True:
        gauges = {
            (name, tier): after.get((name, frozenset({("model", "llm"), ("version", "1"), ("tier", tier)})))
            for name in ("hetserve_requests_running", "hetserve_requests_waiting") for tier in ("llm", "prefill")
        }
        if all(v == 0 for v in gauges.values()):  # written (None: never) and zero
            break
        assert time.monotonic() < deadline, f"requests still counted in flight 10 s after all ended: {gauges}"
        time.sleep(0.2)
        after = samples(server)
