"""Seeded sampling through the split equals a single engine, token for token.

Prefill samples the first token; llm's engine continues with the first token
forced (first_token.py), so its sampler, penalties and grammar are where a
single engine's are. Prompts on both routes: prefilled in llm (short) and by
the prefill model (long).
"""

from __future__ import annotations

import json
import pytest

from hetserve_client import generate_http
from triton_calls import stream_ids_concurrently

PROMPTS = [
    "Hello",
    "The quick brown fox",
    "Why is memory bandwidth the limit?",
    "one two three four five",
    "model token cache " * 20,
    "When where why how what which who this that these those. " * 12,
    "prefill decode " * 64,
    "Send receive cancel error prompt text output input engine worker! " * 20,
]
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "count": {"type": "integer"}},
    "required": ["name", "count"],
}
SETTINGS = {
    "penalties": {"temperature": 0.9, "seed": 1234, "presence_penalty": 0.7, "frequency_penalty": 0.3,
                  "repetition_penalty": 1.2, "min_tokens": 4},
    "top-k/top-p": {"temperature": 1.2, "seed": 99, "top_k": 50, "top_p": 0.85, "min_p": 0.01,
                    "logit_bias": {"7": 3.0}, "stop_token_ids": [5], "bad_words": ["better"], "stop": ["!"]},
    "json schema": {"temperature": 0.8, "seed": 7, "structured_outputs": {"json": SCHEMA}},
}


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_seeded_sampling_equals_a_single_engine(server, reference, setting):
    sampling = {**SETTINGS[setting], "max_tokens": 48}
    want = reference(PROMPTS, sampling)
    lengths = [len(w["prompt_token_ids"]) for w in want]
    assert min(lengths) < 32 <= max(lengths)  # both routes

    got = stream_ids_concurrently(server.grpc_url, PROMPTS, sampling)
    for prompt, ids, w in zip(PROMPTS, got, want):
        assert ids == w["token_ids"], f"{setting}: {prompt[:30]!r}"
    for prompt, w in zip(PROMPTS[::3], want[::3]):
        assert generate_http(server.http_url, prompt, sampling).text == w["text"]
    if setting == "json schema":  # the grammar held across the boundary
        for w in want:
            assert w["text"].lstrip().startswith("{")
            if len(w["token_ids"]) < 48:  # finished: a whole object (xgrammar lets control characters into strings)
                assert set(json.loads(w["text"], strict=False)) == {"name", "count"}
