"""The split pipeline's greedy output equals a single vLLM engine's, token for token."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from hetserve_client import generate_http, stream_grpc

# Varied lengths: under one 128-token block, around block edges, several blocks.
PROMPTS = [
    "Hello",
    "The quick brown fox jumps over the lazy dog.",
    "Why is memory bandwidth the limit of decode? " * 3,
    "cache " * 127,
    "prefill decode " * 64,
    "model token " * 200,
    "When where why how what which who this that these those. " * 30,
    "one two three four five six seven eight nine ten " * 45,
    "Send receive cancel error prompt text output input engine worker! " * 15,
]
GREEDY = {"max_tokens": 40, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def expected(reference):
    return reference(PROMPTS, GREEDY)


def test_prompts_cover_short_and_multi_block(expected):
    lengths = [len(e["prompt_token_ids"]) for e in expected]
    assert min(lengths) < 128 and max(lengths) > 2 * 128
    assert any(n % 128 for n in lengths if n > 128)  # a partial last block after full ones


def stream_all(server, prompts, sampling):
    def one(prompt):
        return list(stream_grpc(server.grpc_url, prompt, sampling))

    with ThreadPoolExecutor(len(prompts)) as pool:  # concurrent: batched in both engines
        return list(pool.map(one, prompts))


def test_grpc_stream_equals_single_engine(server, expected):
    for prompt, deltas, want in zip(PROMPTS, stream_all(server, PROMPTS, GREEDY), expected):
        ids = [t for d in deltas for t in d.token_ids]
        assert ids == want["token_ids"], prompt[:40]
        assert "".join(d.text for d in deltas) == want["text"]
        assert len(ids) == 40 and len(deltas) > 1  # streamed, not one final blob
        assert all(d.token_ids for d in deltas)  # no empty responses (prefill's token is not sent twice)
        # The first token comes first (alone from prefill; a locally prefilled
        # stream may get it together with the next when the machine is busy).
        assert deltas[0].token_ids[:1] == want["token_ids"][:1]
        assert deltas[-1].finish_reason == "length" and all(d.finish_reason is None for d in deltas[:-1])


def test_a_client_asked_stream_interval_coalesces_tokens_exactly(server, expected):
    """vLLM's per-request stream_interval: the first token at once, then 8 tokens per response, same output."""
    prompts, want = PROMPTS[:4], expected[:4]
    for prompt, deltas, w in zip(prompts, stream_all(server, prompts, {**GREEDY, "stream_interval": 8}), want):
        assert [t for d in deltas for t in d.token_ids] == w["token_ids"], prompt[:40]
        assert "".join(d.text for d in deltas) == w["text"]
        assert deltas[0].token_ids[:1] == w["token_ids"][:1]
        # 1 + 39 tokens in responses of 8 (a busy engine may merge more): at most 1 + 5 responses.
        assert 1 < len(deltas) <= 6, [len(d.token_ids) for d in deltas]
        assert max(len(d.token_ids) for d in deltas) >= 8


def test_http_non_streamed_equals_single_engine(server, expected):
    for prompt, want in zip(PROMPTS, expected):
        got = generate_http(server.http_url, prompt, GREEDY)
        assert got.token_ids == want["token_ids"], prompt[:40]
        assert got.text == want["text"]
        assert (got.finish_reason, got.num_output_tokens) == ("length", 40)
        assert got.num_input_tokens == len(want["prompt_token_ids"])


def test_prompt_is_prepended_unless_excluded(server, expected):
    got = generate_http(server.http_url, PROMPTS[1], GREEDY, exclude_input_in_output=False)
    assert got.text == PROMPTS[1] + expected[1]["text"]


def test_one_token_finishes_in_prefill(server, reference):
    sampling = {"max_tokens": 1, "temperature": 0}
    want = reference(PROMPTS[:2], sampling)
    for prompt, w in zip(PROMPTS[:2], want):
        deltas = list(stream_grpc(server.grpc_url, prompt, sampling))
        assert [t for d in deltas for t in d.token_ids] == w["token_ids"]
        assert deltas[-1].finish_reason in ("length", "stop")
        # Over HTTP Triton writes the one token as a bare number (the client lists it).
        assert generate_http(server.http_url, prompt, sampling).token_ids == w["token_ids"]


def test_eos_and_stop_settings_pass_through(server, reference):
    sampling = {"max_tokens": 33, "temperature": 0, "min_tokens": 5, "stop_token_ids": [7, 8, 9]}
    prompts = PROMPTS[2:5]
    for prompt, want in zip(prompts, reference(prompts, sampling)):
        got = generate_http(server.http_url, prompt, sampling)
        assert got.token_ids == want["token_ids"] and got.text == want["text"]


def kv_samples(server, transport: str = "shm") -> tuple[float, float, float, float]:
    """KV bytes moved and the gather / hand-off / scatter counts, for ``transport``."""
    m = server.metrics()
    labels = f'{{model="llm",transport="{transport}"}}'
    return tuple(
        m.get(name + labels, 0.0)
        for name in (
            "hetserve_kv_bytes_total",
            "hetserve_kv_gather_seconds_count",
            "hetserve_kv_handoff_seconds_count",
            "hetserve_kv_scatter_seconds_count",
        )
    )


@pytest.fixture(scope="module")
def kv_bytes_per_token(engine_args):
    from hetserve.launcher import model_facts

    return model_facts(engine_args)[0].bytes_per_token


def test_long_prompts_move_their_kv_and_short_ones_stay_local(server, expected, kv_bytes_per_token):
    """Routing by prompt length (remote_prefill_min_tokens = 32), seen in the KV metrics."""
    lengths = [len(e["prompt_token_ids"]) for e in expected]
    assert min(lengths) < 32 <= max(lengths)  # both routes are exercised
    for prompt, want, n in zip(PROMPTS, expected, lengths):
        before = kv_samples(server)
        assert generate_http(server.http_url, prompt, GREEDY).token_ids == want["token_ids"]
        moved, *counts = (after - b for after, b in zip(kv_samples(server), before))
        remote = n >= 32
        assert moved == (kv_bytes_per_token * n if remote else 0), prompt[:40]
        assert counts == [1, 1, 1] if remote else [0, 0, 0]


def test_64_streams_are_exact_while_the_engine_holds_tokens_back(server, reference):
    """64 streams at once: auto streams 8 tokens per response, held in vLLM's output processor; as
    streams finish the interval falls for the rest. Every stream is still one engine's, token for token."""
    from hetserve.bench.throughput import make_prompts

    prompts = make_prompts(64, seed=7)  # 20 to 300 words: local and remote prefills
    sampling = {"max_tokens": 32, "temperature": 0, "ignore_eos": True}
    want = reference(prompts, sampling)

    def one(prompt):
        return list(stream_grpc(server.grpc_url, prompt, sampling))

    with ThreadPoolExecutor(len(prompts)) as pool:
        got = list(pool.map(one, prompts))
    for prompt, deltas, w in zip(prompts, got, want):
        assert [t for d in deltas for t in d.token_ids] == w["token_ids"], prompt[:40]
        assert "".join(d.text for d in deltas) == w["text"]
        assert all(d.token_ids for d in deltas) and deltas[-1].finish_reason == "length"
    # coalesced (how much depends on how many streams overlap on two cores): fewer responses than tokens
    assert sum(len(deltas) for deltas in got) < 64 * 32
    assert max(len(d.token_ids) for deltas in got for d in deltas) > 2  # past the first token, which comes alone


def test_request_parameters_stand_for_sampling_parameters_as_in_tritons_vllm_backend(server, expected):
    """No sampling_parameters input: the request's own parameters are the sampling parameters (HTTP and gRPC)."""
    import json
    import urllib.error
    import urllib.request

    import numpy as np

    from triton_calls import infer_stream, strings

    def generate(body: dict) -> dict:
        request = urllib.request.Request(f"http://{server.http_url}/v2/models/llm/generate", data=json.dumps(body).encode())
        with urllib.request.urlopen(request, timeout=300) as response:
            return json.loads(response.read())

    prompt, want = PROMPTS[5], expected[5]["token_ids"]  # a long prompt: prefilled by prefill, which gets them too
    # Triton's vLLM tutorial sends stream among them
    out = generate({"text_input": prompt, "exclude_input_in_output": True,
                    "parameters": {"stream": False, "temperature": 0, "max_tokens": 5, "ignore_eos": True}})
    assert out["output_ids"] == want[:5]
    responses = infer_stream(server.grpc_url, "llm", {"text_input": strings(prompt), "stream": np.array([True])},
                             parameters={"temperature": 0, "max_tokens": 7, "ignore_eos": True})
    assert [int(t) for r in responses for t in r["output_ids"]] == want[:7]
    for bad, named in (({"max_tokens": -3}, "max_tokens"), ({"bogus": 1}, "bogus"), ({"stream": True}, "'stream'")):  # the last: Triton's own refusal
        with pytest.raises(urllib.error.HTTPError) as caught:
            generate({"text_input": prompt, "stream": False, "parameters": bad})
        assert named in caught.value.read().decode()
    assert generate({"text_input": "Hello", "parameters": {"max_tokens": 2, "ignore_eos": True}})["text_output"]  # still serving
