"""The split computes what one engine computes, to the last bit, in bfloat16.

Token-for-token equality (the other tests) leaves room for small numeric
differences; this test leaves none: logprob values, not only token ids, equal
one vLLM engine's exactly, for prompts prefilled by ``llm`` itself and by
``prefill`` (KV through a slot; ``llm``'s engine recomputes the prompt's last
token, and the connector puts prefill's KV for it back), streamed and not.

vLLM's CPU kernels are exact only under two conditions, which both sides meet
here (README, "Exactness"): the same OpenMP team (vLLM reserves one core more
outside the team of an engine with a KV connector, as the served ones have:
the reference engine is given the same reservation), and the same batch (with
two threads, one engine's bfloat16 greedy tokens changed between a batch of
six prompts and each prompt alone): the requests go one at a time.
"""

from __future__ import annotations

import json

import pytest

from conftest import run_server
from hetserve import names
from hetserve.checkpoint import TinyRecipe, default_model_path
from hetserve.engine import SERVED_CPU_RESERVATION
from hetserve.launcher import ServeOptions, engine_settings
from triton_calls import ask_llm

RECIPE = TinyRecipe(name="t-phi3", model_type="phi3", max_position_embeddings=1152, dtype="bfloat16",
                    hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2)
PROMPTS = [
    "Hello",  # prefilled by llm
    "The quick brown fox jumps over the lazy dog.",
    "cache " * 127,  # by prefill, across block boundaries
    "model token " * 150,
    "one two three four five six seven eight nine ten " * 30,
]
SAMPLING = {"max_tokens": 24, "temperature": 0, "ignore_eos": True, "logprobs": 3}


@pytest.fixture(scope="module")
def exact_server(tmp_path_factory):
    path = default_model_path(RECIPE)
    for server in run_server(tmp_path_factory, "--model", str(path)):  # bfloat16: the checkpoint's own
        yield path, server


def remote_prefills(server) -> float:
    return server.metrics().get('hetserve_prefills_total{model="llm",prefilled_by="prefill",version="1"}', 0)


@pytest.mark.parametrize("stream", [True, False])
def test_logprobs_equal_one_engine_bit_for_bit(exact_server, reference, stream):
    path, server = exact_server
    args = engine_settings(ServeOptions(model=str(path)), names.Model.LLM)
    before = remote_prefills(server)
    for prompt in PROMPTS:
        (want,) = reference([prompt], SAMPLING, args, env=SERVED_CPU_RESERVATION)  # alone, as served
        responses = ask_llm(server.grpc_url, prompt, SAMPLING, stream, names.RETURN_LOGPROBS, names.EXCLUDE_INPUT_IN_OUTPUT)
        ids = [int(t) for r in responses for t in r[names.OUTPUT_IDS]]
        got = [entry for r in responses for entry in json.loads(r[names.LOGPROBS][0])]
        assert ids == want["token_ids"], prompt[:30]
        assert got == want["logprobs"], prompt[:30]  # every value, rank and decoded token
    assert remote_prefills(server) - before == 3  # the long prompts crossed the split
