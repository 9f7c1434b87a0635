"""scripts/gpu_check.py's CPU twin: the same checks on CPU tensors, small sizes.

The CUDA run (registered slot, side stream, device timing) needs a GPU machine;
here the converters, the slot and the quantizers run through the same code.
"""

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_twin_checks_every_layout_and_dtype(gpu_check, tmp_path):
    out = tmp_path / "rows.json"
    before = set(os.listdir("/dev/shm"))
    assert gpu_check.main(["--device", "cpu", "--tokens", "40", "--repeats", "1", "--json", str(out)]) == 0
    assert set(os.listdir("/dev/shm")) <= before  # the slot file is gone
    rows = json.loads(out.read_text())
    converters = [r for r in rows if r["check"] == "converter"]
    assert {(r["layout"], r["block_size"]) for r in converters} == {
        (name, bs) for name in gpu_check.STRIDE_ORDERS for bs in (16, 32, 64)
    }
    assert all(r["gather_equal"] and r["scatter_equal"] for r in converters)
    d2h = {r["mode"]: r for r in rows if r["check"] == "d2h"}
    assert d2h["whole"]["equal"] and d2h["per_layer_side_stream"]["equal"]
    quantized = {r["dtype"]: r for r in rows if r["check"] == "quantize"}
    assert set(quantized) == {"float16", "bfloat16", "int8", "fp8_e4m3"}
    # Relative to each row's largest value: half a quantization step, plus bfloat16's own rounding.
    assert quantized["bfloat16"]["max_rel_error"] == 0
    assert quantized["int8"]["max_rel_error"] <= 0.5 / 127 + 2**-8
    assert quantized["fp8_e4m3"]["max_rel_error"] <= 2**-4 + 2**-8
    assert quantized["int8"]["wire_bytes"] < quantized["bfloat16"]["wire_bytes"]


def test_the_stride_orders_are_vllms(gpu_check):
    from vllm.v1.kv_cache_layout import KVCacheLayout

    assert gpu_check.STRIDE_ORDERS == {layout.name: tuple(layout.stride_order) for layout in KVCacheLayout}


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible: the script would run on it")
def test_without_a_gpu_it_says_why_and_fails(gpu_check, capsys):
    assert gpu_check.main([]) == 2
    assert "no CUDA device" in capsys.readouterr().err
