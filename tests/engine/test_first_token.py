"""Forcing the first token keeps a seeded sampler exactly where a single engine's is.

A consumer engine (with ForceFirstToken) given the prompt and a single
engine's first token must go on with exactly the single engine's tokens, for
seeded sampling with penalties and with top-k/top-p; forcing another token
must make that token come out first.
"""

import pytest

from engine_runner import run_engine
from hetserve.first_token import FIRST_TOKEN_KEY

PROMPTS = [[(11 * i + 5 * j) % 2000 + 2 for i in range(n)] for j, n in enumerate([3, 40, 130])]
SETTINGS = {
    "penalties": {"temperature": 0.9, "seed": 11, "presence_penalty": 0.8, "frequency_penalty": 0.4, "repetition_penalty": 1.3},
    "top-k/top-p": {"temperature": 1.1, "seed": 5, "top_k": 40, "top_p": 0.9, "min_p": 0.02},
}


@pytest.fixture(scope="module")
def runs(engine_args, tmp_path_factory):
    def requests(extra=None):
        out = []
        for name, sampling in SETTINGS.items():
            for j, ids in enumerate(PROMPTS):
                item = {"prompt_token_ids": ids, "sampling": {**sampling, "max_tokens": 24, "ignore_eos": True}}
                if extra:
                    item["sampling"]["extra_args"] = extra(name, j)
                out.append(item)
        return out

    single = run_engine({"engine_args": engine_args, "requests": requests()}, tmp_path_factory.mktemp("single"))
    firsts = {(name, j): single[i * len(PROMPTS) + j]["token_ids"][0] for i, name in enumerate(SETTINGS) for j in range(len(PROMPTS))}
    forced = run_engine(
        {"engine_args": engine_args, "kv_role": "kv_consumer",
         "requests": requests(lambda name, j: {FIRST_TOKEN_KEY: firsts[(name, j)]})},
        tmp_path_factory.mktemp("forced"),
    )
    other = run_engine(
        {"engine_args": engine_args, "kv_role": "kv_consumer",
         "requests": requests(lambda name, j: {FIRST_TOKEN_KEY: (firsts[(name, j)] + 1) % 2000})},
        tmp_path_factory.mktemp("other"),
    )
    return single, forced, other, firsts


def test_forcing_the_single_engines_first_token_changes_nothing(runs):
    single, forced, _, _ = runs
    for a, b in zip(single, forced):
        assert b["token_ids"] == a["token_ids"]


def test_the_forced_token_comes_out_first(runs):
    single, _, other, firsts = runs
    for i, name in enumerate(SETTINGS):
        for j in range(len(PROMPTS)):
            assert other[i * len(PROMPTS) + j]["token_ids"][0] == (firsts[(name, j)] + 1) % 2000
