"""The ``unified`` model: llm's interface, one engine doing prefill and decode
(no prefill tier) — the A/B baseline. Served alone (``--models unified``), it
must give exactly what ``llm`` gives through the split, and a single engine."""

from __future__ import annotations

import pytest

from conftest import run_server
from hetserve_client import generate_http, stream_grpc

PROMPTS = ["model token " * 200, "cache " * 127, "Hello", "Beautiful is better than"]
GREEDY = {"max_tokens": 24, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def unified_server(tmp_path_factory):
    yield from run_server(tmp_path_factory, "--models", "unified")


def ids(url: str, prompt: str, model: str) -> list[int]:
    return [t for d in stream_grpc(url, prompt, GREEDY, model=model) for t in d.token_ids]


def test_unified_equals_llm_and_a_single_engine(unified_server, server, reference):
    for prompt, want in zip(PROMPTS, reference(PROMPTS, GREEDY)):
        unified = ids(unified_server.grpc_url, prompt, "unified")
        assert unified == ids(server.grpc_url, prompt, "llm") == want["token_ids"], prompt[:30]
        assert generate_http(unified_server.http_url, prompt, GREEDY, model="unified").text == want["text"]
    metrics = unified_server.metrics()
    assert metrics['hetserve_prefills_total{model="unified",prefilled_by="local",version="1"}'] == 2 * len(PROMPTS)
    assert not [k for k in metrics if k.startswith("hetserve_kv_bytes_total")]  # nothing moved
    assert "unified: no prefill tier; every prompt is prefilled by this model's engine" in unified_server.log_text()
