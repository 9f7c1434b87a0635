"""The default checkpoint is built deterministically and loads like any other."""

import hashlib

from hetserve.checkpoint import DEFAULT_MODEL, TinyRecipe, build_tiny, resolve_model


def digest(path):
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def test_build_is_deterministic(tmp_path, model_path):
    recipe = TinyRecipe()
    rebuilt = build_tiny(tmp_path / "again", recipe)
    assert digest(rebuilt) == digest(model_path)
    assert (rebuilt / "tokenizer.json").read_bytes() == (model_path / "tokenizer.json").read_bytes()


def test_resolve_model():
    assert resolve_model("/some/path") == "/some/path"
    assert resolve_model(DEFAULT_MODEL).endswith(TinyRecipe().digest)


def test_tokenizer_round_trips_text(model_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    text = "Hello world, the quick brown fox: 42 tokens!"
    assert tok.decode(tok(text).input_ids) == text
