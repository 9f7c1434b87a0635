"""A prefill tier on another Triton server: two ``hetserve serve`` processes on
loopback ports, one serving only ``prefill`` (``--models prefill``), one only
``llm`` with ``prefill_model=grpc://127.0.0.1:PORT/prefill``. The KV crosses
as the interchange tensor over gRPC. The llm server's engine pages its KV in
blocks of 32 tokens, the prefill server's in vLLM's default 128: the
interchange tensor is the same whatever the block sizes on either side. The
prefill server saves the KV layer by layer (``kv_save``).

Checked against a single vLLM engine: greedy output identical through the
remote tier; a client's cancellation ends its request and both servers serve
on; a remote server that stops answering (SIGSTOP) or goes away costs a local
prefill, never a hang or an error.
"""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest
from tritonclient.utils import InferenceServerException

from conftest import run_server
from hetserve_client import generate_http, stream_grpc

PROMPTS = ["model token " * 200, "cache " * 127]
GREEDY = {"max_tokens": 24, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """(prefill server, its stopper, llm server): the prefill server is stopped by a test."""
    prefill_run = run_server(tmp_path_factory, "--models", "prefill", "--model-parameter", "prefill:kv_save=layer")
    prefill = next(prefill_run)
    tier = f"grpc://{prefill.grpc_url}/prefill"
    llm_run = run_server(
        tmp_path_factory, "--models", "llm", f"--model-parameter=llm:prefill_model={tier}", "--engine-arg", "block_size=32"
    )
    int8_run = run_server(
        tmp_path_factory, "--models", "llm", f"--model-parameter=llm:prefill_model={tier}",
        "--model-parameter=llm:kv_transfer_dtype=int8",
    )
    try:
        llm = next(llm_run)
        int8 = next(int8_run)
        yield prefill, lambda: next(prefill_run, None), llm, int8
        next(int8_run, None)
        next(llm_run, None)
    finally:
        int8_run.close()
        llm_run.close()
        prefill_run.close()


def prefilled_by(server, tier: str) -> float:
    return server.metrics().get(f'hetserve_prefills_total{{model="llm",prefilled_by="{tier}",version="1"}}', 0)


def stream_ids(server, prompt: str, sampling=GREEDY) -> list[int]:
    return [t for d in stream_grpc(server.grpc_url, prompt, sampling) for t in d.token_ids]


def test_each_server_serves_only_its_models(servers):
    prefill, _, llm, _ = servers
    assert "llm: not served here (--models)" in prefill.log_text()
    assert "prefill: not served here (--models)" in llm.log_text()
    with pytest.raises(InferenceServerException, match="llm"):
        list(stream_grpc(prefill.grpc_url, "Hello", GREEDY))


def test_remote_prefill_equals_single_engine(servers, reference):
    prefill, _, llm, _ = servers
    tier = f"grpc://{prefill.grpc_url}/prefill"
    for prompt, want in zip(PROMPTS, reference(PROMPTS, GREEDY)):
        assert stream_ids(llm, prompt) == want["token_ids"], prompt[:30]
        assert generate_http(llm.http_url, prompt, GREEDY).text == want["text"]
    metrics = llm.metrics()
    assert prefilled_by(llm, tier) == 4
    assert metrics['hetserve_kv_bytes_total{model="llm",transport="grpc"}'] > 0
    assert metrics.get('hetserve_kv_bytes_total{model="llm",transport="shm"}', 0) == 0
    # The prefill server did the prefills: its own metrics count the requests.
    assert prefill.metrics()['nv_inference_request_success{model="prefill",version="1"}'] == 4
    assert "KV pages: CPU_ATTN, block size 32" in llm.log_text()
    assert "KV pages: CPU_ATTN, block size 128" in prefill.log_text()
    assert "KV saved layer by layer" in prefill.log_text()


def test_cancelled_request_ends_and_both_servers_serve_on(servers, reference):
    prefill, _, llm, _ = servers
    long = {"max_tokens": 1500, "temperature": 0, "ignore_eos": True}
    stream = stream_grpc(llm.grpc_url, PROMPTS[0], long)
    next(stream)
    stream.close()  # cancels the request
    want = reference(PROMPTS[:1], GREEDY)[0]["token_ids"]
    assert stream_ids(llm, PROMPTS[0]) == want


def test_int8_over_grpc_moves_a_quarter_and_a_bit(servers, reference):
    """Compression in transit across servers: the same prompt through llm (float32) and an int8 llm."""
    _, _, llm, int8 = servers
    key = 'hetserve_kv_bytes_total{model="llm",transport="grpc"}'
    want = reference(PROMPTS[:1], GREEDY)[0]["token_ids"]
    moved = {}
    for name, server in (("float32", llm), ("int8", int8)):
        before = server.metrics().get(key, 0)
        got = stream_ids(server, PROMPTS[0])
        assert len(got) == len(want) and got[0] == want[0]
        moved[name] = server.metrics()[key] - before
    assert moved["int8"] == pytest.approx(moved["float32"] * (0.25 + 1 / 64)) and moved["int8"] > 0


def _server_process(server) -> psutil.Process:
    (tritonserver,) = [p for p in psutil.Process(server.pid).children() if "tritonserver" in p.name()]
    return tritonserver


def test_a_stalled_then_gone_remote_tier_costs_a_local_prefill(servers, reference):
    prefill, stop_prefill, llm, _ = servers
    want = [w["token_ids"] for w in reference(PROMPTS, GREEDY)]
    stalled = _server_process(prefill)
    local = prefilled_by(llm, "local")
    os.kill(stalled.pid, signal.SIGSTOP)  # accepts connections, answers nothing
    try:
        started = time.monotonic()
        assert stream_ids(llm, PROMPTS[0]) == want[0]
        assert time.monotonic() - started < 30  # readiness timed out: not the 60 s prefill_timeout_s
    finally:
        os.kill(stalled.pid, signal.SIGCONT)
    assert prefilled_by(llm, "local") == local + 1
    stop_prefill()
    for prompt, ids in zip(PROMPTS, want):
        assert stream_ids(llm, prompt) == ids
    assert prefilled_by(llm, "local") == local + 3
