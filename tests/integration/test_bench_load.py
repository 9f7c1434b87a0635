"""The throughput benchmark's streamed load: every request's tokens counted, errors raised."""

from __future__ import annotations

import asyncio

import pytest
from tritonclient.utils import InferenceServerException

from hetserve.bench.throughput import _streamed_pass, make_prompts


def test_streamed_pass_counts_every_token_of_every_request(server):
    prompts = make_prompts(5, seed=3)  # 20 to 300 words: local and remote prefills
    sampling = {"max_tokens": 6, "temperature": 0, "ignore_eos": True}
    before = generated(server)
    tokens = asyncio.run(_streamed_pass(server.grpc_url, prompts, sampling, concurrency=2, model="llm"))
    assert tokens == 5 * 6
    assert generated(server) - before == 5 * 6  # nothing generated that was not counted, nor counted twice


def test_streamed_pass_raises_the_servers_error(server):
    sampling = {"max_tokens": 2, "temperature": 0, "ignore_eos": True}
    with pytest.raises(InferenceServerException, match="no_such_model"):
        asyncio.run(_streamed_pass(server.grpc_url, ["hello"], sampling, concurrency=1, model="no_such_model"))


def generated(server) -> float:
    return sum(v for k, v in server.metrics().items() if k.startswith("vllm:generation_tokens_total{") and 'model="llm"' in k)
