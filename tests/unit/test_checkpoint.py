"""The default checkpoint is built deterministically and loads like any other."""

import hashlib

from hetserve.checkpoint import BUILTIN, DEFAULT_MODEL, build_tiny, resolve_model


def digest(path):
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def test_build_is_deterministic(tmp_path, model_path):
    recipe = BUILTIN[DEFAULT_MODEL]
    rebuilt = build_tiny(tmp_path / "again", recipe)
    assert digest(rebuilt) == digest(model_path)
    assert (rebuilt / "tokenizer.json").read_bytes() == (model_path / "tokenizer.json").read_bytes()


def test_resolve_model():
    assert resolve_model("/some/path") == "/some/path"
    assert resolve_model(DEFAULT_MODEL).endswith(BUILTIN[DEFAULT_MODEL].digest)


def test_tokenizer_round_trips_text(model_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    text = "Hello world, the quick brown fox: 42 tokens!"
    assert tok.decode(tok(text).input_ids) == text


def test_the_default_model_continues_the_zen_of_python(model_path):
    """Greedy, it continues the text it was trained on, so a person can check it by eye."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    ids = tok("Beautiful is better than", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert tok.decode(out[0]).startswith("Beautiful is better than ugly.\nExplicit is better than implicit.")


def test_the_benchmark_model_has_over_100m_parameters():
    import torch
    from transformers import AutoModelForCausalLM

    from hetserve.checkpoint import BENCH_MODEL, model_config

    with torch.device("meta"):  # counted, not built
        model = AutoModelForCausalLM.from_config(model_config(BUILTIN[BENCH_MODEL]))
    assert sum(p.numel() for p in model.parameters()) >= 100_000_000
    assert BUILTIN[BENCH_MODEL].dtype == "bfloat16"
