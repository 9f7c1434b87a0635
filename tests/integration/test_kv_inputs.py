"""KV a client sends to llm itself: used when it fits, refused when it does not.

The KV comes from the prefill model called directly without a slot (tensor
transport): the interchange tensor, its token ids and fingerprint.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from hetserve import names
from hetserve.checkpoint import zen_of_python
from triton_calls import infer_stream, strings

# The text the default model was trained on: what it predicts there depends on
# the context (the KV), which the negative control needs. Over one KV block.
PROMPT = zen_of_python()[:600]
GREEDY = {"max_tokens": 24, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def expected(reference):
    return reference([PROMPT], GREEDY)[0]


@pytest.fixture(scope="module")
def prefilled(server):
    """prefill's one response: the first token and the prompt's KV as a tensor."""
    (out,) = infer_stream(server.grpc_url, "prefill", {
        names.TEXT_INPUT: strings(PROMPT),
        names.SAMPLING_PARAMETERS: strings(json.dumps(GREEDY)),
    })
    return out


def continue_from(server, prefilled, **replace) -> list[int]:
    """llm's tokens after prefill's first one, from the KV the client sends."""
    inputs = {
        names.KV_CACHE: prefilled[names.KV_CACHE],
        names.KV_TOKEN_IDS: prefilled[names.KV_TOKEN_IDS],
        names.KV_FINGERPRINT: prefilled[names.KV_FINGERPRINT],
        names.INPUT_IDS: prefilled[names.OUTPUT_IDS],
        names.SAMPLING_PARAMETERS: strings(json.dumps({**GREEDY, "max_tokens": GREEDY["max_tokens"] - 1})),
        names.STREAM: np.array([True]),
    }
    inputs.update(replace)
    inputs = {k: v for k, v in inputs.items() if v is not None}
    return [int(t) for r in infer_stream(server.grpc_url, "llm", inputs) for t in r[names.OUTPUT_IDS]]


def test_prefill_returns_kv_for_every_prompt_token(prefilled, expected):
    kv, ids = prefilled[names.KV_CACHE], prefilled[names.KV_TOKEN_IDS]
    assert ids.tolist() == expected["prompt_token_ids"]
    assert kv.shape == (4, 2, 2, len(ids), 64) and kv.dtype == np.float32
    assert prefilled[names.OUTPUT_IDS].tolist() == expected["token_ids"][:1]
    assert json.loads(prefilled[names.KV_REF][0])["num_tokens"] == len(ids)


def test_llm_continues_from_client_kv_like_a_single_engine(server, prefilled, expected):
    first = prefilled[names.OUTPUT_IDS].tolist()
    assert first + continue_from(server, prefilled) == expected["token_ids"]


def test_negative_control_noise_kv_changes_the_output(server, prefilled, expected):
    """If llm recomputed the prompt instead of using the KV, noise would not matter."""
    kv = prefilled[names.KV_CACHE]
    noise = np.random.default_rng(0).standard_normal(kv.shape).astype(np.float32) * kv.std()
    first = prefilled[names.OUTPUT_IDS].tolist()
    assert first + continue_from(server, prefilled, kv_cache=noise) != expected["token_ids"]
    # Only the partial last block's slots randomised: still a different output.
    tail = kv.copy()
    start = (kv.shape[3] // 128) * 128
    tail[:, :, :, start:] = noise[:, :, :, start:]
    assert first + continue_from(server, prefilled, kv_cache=tail) != expected["token_ids"]


def mismatches(prefilled):
    kv, ids = prefilled[names.KV_CACHE], prefilled[names.KV_TOKEN_IDS]
    fingerprint = json.loads(prefilled[names.KV_FINGERPRINT][0])
    other_model = strings(json.dumps({**fingerprint, "num_layers": 5}))
    return {
        "fingerprint": ({names.KV_FINGERPRINT: other_model}, "num_layers: got 5, expected 4"),
        "token count": ({names.KV_TOKEN_IDS: np.append(ids, 5)}, "KV shape is"),
        "shape": ({names.KV_CACHE: np.ascontiguousarray(kv[:, :, :1])}, "KV shape is"),
        "dtype": ({names.KV_CACHE: kv.astype(np.float16)}, "FP16"),
        "missing": ({names.KV_FINGERPRINT: None}, r"without input\(s\) \['kv_fingerprint'\]"),
        "input_ids alone": (
            {names.KV_CACHE: None, names.KV_TOKEN_IDS: None, names.KV_FINGERPRINT: None},
            "input_ids are the tokens that follow a client's KV .*; send a prompt as text_input",
        ),
        "garbage fingerprint": ({names.KV_FINGERPRINT: strings("{")}, "kv_fingerprint"),
        "token out of vocabulary": ({names.INPUT_IDS: np.array([10**9])}, "outside the vocabulary"),
        "negative token": ({names.KV_TOKEN_IDS: np.where(ids == ids[0], -3, ids)}, "token id -3"),
    }


@pytest.mark.parametrize("case", [
    "fingerprint", "token count", "shape", "dtype", "missing", "input_ids alone", "garbage fingerprint",
    "token out of vocabulary", "negative token",
])
def test_mismatched_kv_is_refused_and_serving_goes_on(server, prefilled, expected, case):
    replace, message = mismatches(prefilled)[case]
    with pytest.raises(InferenceServerException, match=message):
        continue_from(server, prefilled, **replace)
    first = prefilled[names.OUTPUT_IDS].tolist()
    assert first + continue_from(server, prefilled) == expected["token_ids"]


def test_prefill_refuses_a_slot_that_is_not_this_servers(server):
    bad = json.dumps({"path": "/etc/passwd", "capacity": 1 << 20, "nonce": 1})
    with pytest.raises(InferenceServerException, match="not a slot of this server"):
        infer_stream(server.grpc_url, "prefill", {names.TEXT_INPUT: strings(PROMPT), names.KV_SLOT: strings(bad)})
