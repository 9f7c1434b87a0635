"""Model fingerprints and KV validation."""

import dataclasses
import json

import pytest
import torch

from hetserve.kv.format import KVMismatchError, ModelFingerprint, validate_kv

FP = ModelFingerprint("LlamaForCausalLM", num_layers=4, num_kv_heads=2, head_dim=64, rope='{"rope_theta": 10000.0}', dtype="float32")


def kv_for(fp, tokens, dtype=None):
    return torch.zeros(fp.kv_shape(tokens), dtype=dtype or fp.torch_dtype), torch.arange(tokens)


def test_json_round_trip():
    assert ModelFingerprint.from_json(FP.to_json()) == FP
    assert FP.bytes_per_token == 2 * 4 * 2 * 64 * 4


def test_from_hf_config_reads_the_kv_geometry():
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3)
    config.architectures = ["LlamaForCausalLM"]
    fp = ModelFingerprint.from_hf_config(config, torch.bfloat16)
    assert (fp.num_layers, fp.num_kv_heads, fp.head_dim, fp.dtype) == (3, 2, 64, "bfloat16")
    assert "10000" in fp.rope


def test_matching_kv_passes():
    kv, ids = kv_for(FP, 130)
    validate_kv(FP, FP, kv, ids, max_tokens=2048)


@pytest.mark.parametrize("field, value", [("num_layers", 5), ("num_kv_heads", 4), ("head_dim", 32), ("rope", "{}"), ("dtype", "float16"), ("architecture", "Other")])
def test_fingerprint_mismatch_names_the_field(field, value):
    received = dataclasses.replace(FP, **{field: value})
    kv, ids = kv_for(FP, 10)
    with pytest.raises(KVMismatchError, match=f"{field}: got"):
        validate_kv(FP, received, kv, ids, max_tokens=2048)


def test_dtype_shape_and_count_mismatches():
    kv, ids = kv_for(FP, 10, dtype=torch.float16)
    with pytest.raises(KVMismatchError, match="dtype"):
        validate_kv(FP, FP, kv, ids, 2048)
    kv, _ = kv_for(FP, 10)
    with pytest.raises(KVMismatchError, match=r"shape is \(4, 2, 2, 10, 64\), expected \(4, 2, 2, 11, 64\)"):
        validate_kv(FP, FP, kv, torch.arange(11), 2048)
    with pytest.raises(KVMismatchError, match="more than this model accepts"):
        validate_kv(FP, FP, *kv_for(FP, 10), max_tokens=9)
    with pytest.raises(KVMismatchError, match="non-empty"):
        validate_kv(FP, FP, *kv_for(FP, 0), max_tokens=9)


@pytest.mark.parametrize("text", ["not json", "[]", json.dumps({"architecture": "x"}), json.dumps({**json.loads(FP.to_json()), "num_layers": -1})])
def test_garbage_fingerprints_are_refused(text):
    with pytest.raises(KVMismatchError, match="kv_fingerprint"):
        ModelFingerprint.from_json(text)
