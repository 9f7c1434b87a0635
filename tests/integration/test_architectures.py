"""The split is exact on small random checkpoints of several architectures.

Each is built here (random weights, the built-in tokenizer), served with
``hetserve serve --model PATH`` and no other flag — so with its own context
length (none of them 2,048) and dtype — and compared, greedy and token for
token, with one offline vLLM engine on the same checkpoint and settings,
streamed over gRPC and non-streamed over HTTP, on prompts below and above the
local-prefill length and across KV block boundaries.
"""

from __future__ import annotations

import pytest

from conftest import run_server
from hetserve import names
from hetserve.checkpoint import TinyRecipe, default_model_path
from hetserve.launcher import ServeOptions, engine_settings, model_facts
from hetserve_client import generate_http
from triton_calls import stream_ids_concurrently

SMALL = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2}
ARCHITECTURES = {
    "llama": TinyRecipe(name="t-llama", max_position_embeddings=1536, **SMALL),
    # Qwen2: attention bias, tied embeddings; bf16 with a 1,024-token context.
    "qwen2": TinyRecipe(name="t-qwen2", model_type="qwen2", max_position_embeddings=1024, dtype="bfloat16",
                        tie_word_embeddings=True, **SMALL),
    "qwen3": TinyRecipe(name="t-qwen3", model_type="qwen3", max_position_embeddings=3072, head_dim=64, **SMALL),
    "mistral": TinyRecipe(name="t-mistral", model_type="mistral", max_position_embeddings=1280,
                          extra=(("sliding_window", None),), **SMALL),
    "gemma2": TinyRecipe(name="t-gemma2", model_type="gemma2", max_position_embeddings=1024, head_dim=32,
                         tie_word_embeddings=True,
                         extra=(("sliding_window", 4096), ("query_pre_attn_scalar", 32)), **SMALL),
    "phi3": TinyRecipe(name="t-phi3", model_type="phi3", max_position_embeddings=1152, **SMALL),
}
PROMPTS = [
    "Hello",
    "The quick brown fox jumps over the lazy dog.",
    "cache " * 127,
    "prefill decode " * 64,
    "model token " * 150,
    "one two three four five six seven eight nine ten " * 30,
]
GREEDY = {"max_tokens": 24, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def served(request, tmp_path_factory):
    recipe = ARCHITECTURES[request.param]
    path = default_model_path(recipe)
    # Each in its checkpoint's own dtype. (vLLM's auto would serve the float32 ones in bfloat16
    # on x86, where vLLM's own greedy tokens can change with the batch and the OpenMP team:
    # README, "Exactness". test_bit_exact.py compares bfloat16 bit for bit, one request at a time.)
    for server in run_server(tmp_path_factory, "--model", str(path), "--dtype", recipe.dtype):
        yield request.param, path, server


def test_split_is_exact_for_the_architecture(served, reference):
    arch, path, server = served
    args = engine_settings(ServeOptions(model=str(path), engine_args={"dtype": ARCHITECTURES[arch].dtype}), names.Model.LLM)
    fingerprint, context = model_facts(args)
    assert context == ARCHITECTURES[arch].max_position_embeddings != 2048  # the model's own
    want = reference(PROMPTS, GREEDY, args)
    lengths = [len(w["prompt_token_ids"]) for w in want]
    assert min(lengths) < 32 and max(lengths) > 2 * 128

    got = stream_ids_concurrently(server.grpc_url, PROMPTS, GREEDY)
    for prompt, ids, w in zip(PROMPTS, got, want):
        assert ids == w["token_ids"], f"{arch} ({fingerprint.dtype}): {prompt[:30]!r}"
        completion = generate_http(server.http_url, prompt, GREEDY)
        assert (completion.token_ids, completion.text) == (w["token_ids"], w["text"])
