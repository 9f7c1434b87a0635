"""Triton's perf_analyzer (tritonclient 2.51.0's binary) streams from llm, as users measure it."""

from __future__ import annotations

import json

from hetserve.bench import perf


def test_perf_analyzer_streams_from_llm(server, tmp_path):
    binary, env = perf.install()
    max_tokens = 12
    data = tmp_path / "input.json"
    prompts = ["hello world", "the model token cache " * 20]  # prefilled locally, and by prefill
    data.write_text(json.dumps(perf.input_data(prompts, max_tokens)))
    before = generated(server)
    row = perf.run(binary, env, server.grpc_url, "llm", data, concurrency=2, requests=8, timeout_s=300)
    assert row["concurrency"] == 2 and row["requests_per_s"] > 0
    # one response per token, none empty (the window's edges blur the count a little)
    assert 0.8 * max_tokens <= row["responses_per_s"] / row["requests_per_s"] <= 1.2 * max_tokens
    assert row["latency_us_p99"] >= row["latency_us_p50"] > 0
    assert generated(server) - before >= 8 * max_tokens  # at least a window's requests, all of them generated


def generated(server) -> float:
    return sum(
        v for k, v in server.metrics().items() if k.startswith("vllm:generation_tokens_total{") and 'model="llm"' in k
    )
