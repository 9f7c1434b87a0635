"""Bad requests get an error naming the problem; nothing else is lost."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from hetserve import names
from hetserve_client import generate_http, stream_grpc
from triton_calls import infer_stream, strings

GOOD = "The quick brown fox jumps over the lazy dog."
GREEDY = {"max_tokens": 16, "temperature": 0, "ignore_eos": True}

BAD = {
    "malformed JSON": (GOOD, "{max_tokens: 3", "not valid JSON"),
    "unknown field": (GOOD, json.dumps({"max_tokenz": 3}), r"unknown field\(s\) \['max_tokenz'\]"),
    "negative max_tokens": (GOOD, json.dumps({"max_tokens": -4}), "max_tokens must be at least 1"),
    "empty prompt": ("", json.dumps(GREEDY), "text_input is empty"),
    "prompt over the context": ("word " * 2100, json.dumps(GREEDY), "maximum context length is 2048 tokens"),
}


def llm_inputs(prompt, sampling_json, stream=True):
    return {
        names.TEXT_INPUT: strings(prompt),
        names.STREAM: np.array([stream]),
        names.SAMPLING_PARAMETERS: strings(sampling_json),
    }


@pytest.fixture(scope="module")
def expected(reference):
    return reference([GOOD], GREEDY)[0]


LONG = "model token " * 40  # prefilled by the prefill model when it is valid


@pytest.mark.parametrize("sampling, message", [
    ({"max_tokens": 4, "logit_bias": {"99999": 1}}, "out-of-vocab token ids"),
    ({"max_tokens": 4, "logprobs": 2048}, "greater than max allowed"),
])
def test_a_bad_request_on_the_prefill_route_is_refused_by_llm_itself(server, sampling, message):
    # Prefill's refusal reaches llm without its code (a BLS response's error in
    # Triton 2.51): it looked like prefill failing (a warning, a second try).
    start = len(server.log_text())
    with pytest.raises(InferenceServerException, match=message):
        generate_http(server.http_url, LONG, sampling)
    assert "prefill failed" not in server.log_text()[start:]


@pytest.mark.parametrize("case", list(BAD))
def test_bad_request_gets_a_clear_error(server, expected, case):
    prompt, sampling_json, message = BAD[case]
    with pytest.raises(InferenceServerException, match=message):
        infer_stream(server.grpc_url, "llm", llm_inputs(prompt, sampling_json))
    with pytest.raises(InferenceServerException, match=message):
        generate_http(server.http_url, prompt, sampling_json)
    got = generate_http(server.http_url, GOOD, GREEDY)
    assert got.token_ids == expected["token_ids"]


def test_streaming_with_the_prompt_included_is_refused(server):
    inputs = {**llm_inputs(GOOD, json.dumps(GREEDY)), names.EXCLUDE_INPUT_IN_OUTPUT: np.array([False])}
    with pytest.raises(InferenceServerException, match="exclude_input_in_output"):
        infer_stream(server.grpc_url, "llm", inputs)


def test_bad_requests_among_good_ones_lose_nothing(server, expected):
    def good():
        return [t for d in stream_grpc(server.grpc_url, GOOD, GREEDY) for t in d.token_ids]

    def bad(case):
        prompt, sampling_json, message = BAD[case]
        try:
            infer_stream(server.grpc_url, "llm", llm_inputs(prompt, sampling_json))
        except InferenceServerException as exc:
            return re.search(message, str(exc)) is not None
        return False

    with ThreadPoolExecutor(8) as pool:
        goods = [pool.submit(good) for _ in range(4)]
        bads = [pool.submit(bad, case) for case in BAD]
        assert all(f.result() == expected["token_ids"] for f in goods)
        assert all(f.result() for f in bads)


def test_shared_memory_and_repository_apis_need_the_admin_key(server):
    """No client maps the server's memory or unloads its models without the launcher's key."""
    import tritonclient.http as httpclient

    key_file = re.search(r"hetserve-admin-key: <the key in (\S+)>", server.log_text()).group(1)
    key = open(key_file).read().strip()
    assert key not in server.log_text() and "<admin key>" in server.log_text()  # the logged command hides it
    region = "/hetserve-test-region"  # never created: the call must be refused before it looks
    client = httpclient.InferenceServerClient(server.http_url)
    try:
        for call in (
            lambda h: client.register_system_shared_memory("r", region, 64, headers=h),
            lambda h: client.unload_model("prefill", headers=h),
            lambda h: client.get_system_shared_memory_status(headers=h),
        ):
            with pytest.raises(InferenceServerException, match="This API is restricted"):
                call(None)
            with pytest.raises(InferenceServerException, match="This API is restricted"):
                call({"hetserve-admin-key": "wrong"})
        assert client.get_system_shared_memory_status(headers={"hetserve-admin-key": key}) == []
        assert client.is_server_ready()  # inference and health stay open
    finally:
        client.close()
