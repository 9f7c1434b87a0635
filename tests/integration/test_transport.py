"""The tensor transport: prefill returns the KV as a Triton tensor, llm copies it
into a slot. Chosen per deployment (``kv_transport``); this module starts its own
server with ``--kv-transport tensor`` and stops it when done."""

from __future__ import annotations

import pytest

from conftest import run_server
from hetserve_client import generate_http, stream_grpc

PROMPTS = ["model token " * 200, "cache " * 127, "Hello"]
GREEDY = {"max_tokens": 24, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def tensor_server(tmp_path_factory):
    yield from run_server(tmp_path_factory, "--kv-transport", "tensor")


def test_tensor_transport_equals_single_engine(tensor_server, reference):
    for prompt, want in zip(PROMPTS, reference(PROMPTS, GREEDY)):
        streamed = [t for d in stream_grpc(tensor_server.grpc_url, prompt, GREEDY) for t in d.token_ids]
        assert streamed == want["token_ids"], prompt[:30]
        assert generate_http(tensor_server.http_url, prompt, GREEDY).text == want["text"]
    metrics = tensor_server.metrics()
    labels = '{model="llm",transport="tensor"}'
    assert metrics["hetserve_kv_handoff_seconds_count" + labels] == 4  # two long prompts, twice each
    assert metrics.get('hetserve_kv_bytes_total{model="llm",transport="shm"}', 0) == 0
