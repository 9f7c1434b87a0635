"""Logprobs as Triton's vLLM backend returns them, equal to a single engine's.

``return_logprobs`` -> ``logprobs`` (JSON, per token {id: {logprob, rank,
decoded_token}}), ``return_cumulative_logprob`` -> ``cumulative_logprob``;
streamed, the first token's come from prefill (long prompts) or llm's engine.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from hetserve import names
from triton_calls import ask_llm, infer_stream, strings

PROMPTS = ["Hello", "The quick brown fox jumps", "model token cache " * 20, "prefill decode " * 70]
SAMPLING = {"max_tokens": 12, "temperature": 0, "ignore_eos": True, "logprobs": 3}
# Token ids are exact; logprob values only close. The split adds no difference of its
# own (test_bit_exact.py), but the served engines run two OpenMP threads here and the
# reference one (vLLM reserves a core more beside an engine with a KV connector), and
# a two-thread engine's float32 logprobs move by up to 5.7e-6 with what a request is
# batched with (README, "Exactness"). A misplaced position or token is off by far more.
TOLERANCE = 1e-3


def ask(server, prompt: str, stream: bool) -> list[dict]:
    flags = (names.RETURN_LOGPROBS, names.RETURN_CUMULATIVE_LOGPROB, names.EXCLUDE_INPUT_IN_OUTPUT)
    return ask_llm(server.grpc_url, prompt, SAMPLING, stream, *flags)


@pytest.mark.parametrize("stream", [True, False])
def test_logprobs_equal_a_single_engine(server, reference, stream):
    want = reference(PROMPTS, SAMPLING)
    for prompt, w in zip(PROMPTS, want):
        responses = ask(server, prompt, stream)
        ids = [int(t) for r in responses for t in r[names.OUTPUT_IDS]]
        got = [entry for r in responses for entry in json.loads(r[names.LOGPROBS][0])]
        assert ids == w["token_ids"], prompt[:30]
        assert len(got) == len(ids) == len(w["logprobs"])
        for token, ours, theirs in zip(ids, got, w["logprobs"]):
            assert str(token) in ours and len(ours) >= 3
            for key in set(ours) & set(theirs):
                assert abs(ours[key]["logprob"] - theirs[key]["logprob"]) < TOLERANCE, (prompt[:30], key)
                assert ours[key]["decoded_token"] == theirs[key]["decoded_token"]
        cumulative = float(responses[-1][names.CUMULATIVE_LOGPROB][0])
        assert abs(cumulative - w["cumulative_logprob"]) < TOLERANCE * len(ids)


def test_cumulative_logprob_without_logprobs_is_nan_as_in_tritons_vllm_backend(server):
    """vLLM leaves it unset without logprobs; Triton's vLLM backend sends that as NaN (0.0 would read as probability 1)."""
    for prompt in ("Hello", PROMPTS[-1]):  # prefilled by llm, and by prefill (its first token)
        for stream in (True, False):
            responses = ask_llm(server.grpc_url, prompt, {"max_tokens": 3, "temperature": 0}, stream, names.RETURN_CUMULATIVE_LOGPROB)
            assert all(np.isnan(r[names.CUMULATIVE_LOGPROB][0]) for r in responses), (prompt[:20], stream)


def test_prompt_logprobs_are_served_by_local_prefill(server, reference):
    sampling = {**SAMPLING, "prompt_logprobs": 1}
    prompt = PROMPTS[-1]  # long: would otherwise go to prefill
    (want,) = reference([prompt], sampling)
    responses = infer_stream(server.grpc_url, "llm", {
        names.TEXT_INPUT: strings(prompt),
        names.STREAM: np.array([True]),
        names.SAMPLING_PARAMETERS: strings(json.dumps(sampling)),
    })
    assert [int(t) for r in responses for t in r[names.OUTPUT_IDS]] == want["token_ids"]
