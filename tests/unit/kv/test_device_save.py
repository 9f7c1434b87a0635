"""DeviceSaver (kv/device_save.py): a GPU's KV saves, each layer on a side stream.

The CUDA path (side stream, non-blocking copies into a registered slot) needs a
GPU: its test skips here and runs on a GPU machine, as does
``scripts/gpu_check.py``. The CPU twin runs the same gather, encode and copy in
order, and must write exactly what the CPU path (``transfer.gather_encoded``) writes.
"""

import pytest
import torch

from hetserve.kv import flash, transfer
from hetserve.kv.device_save import DeviceSaver
from hetserve.kv.slots import HEADER_BYTES, MappingCache, SlotPool

LAYERS, HEADS, HEAD_DIM, BS, BLOCKS = 4, 2, 16, 16, 9


def cache(device, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(3)
    # FlashAttention's token-major pages ([blocks, bs, H, 2D] storage), seen as [blocks, H, bs, 2D]
    return [(torch.randn(BLOCKS, BS, HEADS, 2 * HEAD_DIM, generator=g) * 3).to(dtype).to(device).transpose(1, 2)
            for _ in range(LAYERS)]


def saved(device, name, per_layer):
    layers, ids, tokens = cache(device), [4, 0, 7, 2], 3 * BS + 5
    shape = (LAYERS, 2, HEADS, tokens, HEAD_DIM)
    flat = torch.zeros(HEADER_BYTES + transfer.encoded_nbytes(name, torch.bfloat16, shape), dtype=torch.uint8)
    payload, scales = transfer.views(flat, name, torch.bfloat16, shape)
    saver = DeviceSaver(flash, torch.device(device))
    if per_layer:
        for i in range(LAYERS):
            saver.save(layers[i : i + 1], ids, payload[i : i + 1], None if scales is None else scales[i : i + 1], name)
    else:
        saver.save(layers, ids, payload, scales, name)
    saver.finish()
    cpu_layers = [layer.cpu() for layer in layers]
    want_payload, want_scales = transfer.views(flat.clone().zero_(), name, torch.bfloat16, shape)
    transfer.gather_encoded(flash, cpu_layers, ids, want_payload, want_scales, name)
    return payload, scales, want_payload, want_scales


@pytest.mark.parametrize("per_layer", [True, False])
@pytest.mark.parametrize("name", ["auto", "float16", "int8", "fp8_e4m3"])
def test_cpu_twin_writes_what_the_cpu_path_writes(name, per_layer):
    payload, scales, want_payload, want_scales = saved("cpu", name, per_layer)
    assert torch.equal(payload.view(torch.uint8), want_payload.view(torch.uint8))
    assert scales is None or torch.equal(scales, want_scales)
    assert payload.view(torch.uint8).any()


def test_cpu_twin_needs_scales_for_scaled_dtypes():
    saver = DeviceSaver(flash, torch.device("cpu"))
    with pytest.raises(ValueError, match="int8 needs its scales"):
        saver.save(cache("cpu"), [0], torch.empty(LAYERS, 2, HEADS, 3, HEAD_DIM, dtype=torch.uint8), None, "int8")
    assert not saver.asynchronous


def test_mapping_cache_lets_the_saver_unregister_before_a_mapping_goes(tmp_path):
    dropped = []
    pool = SlotPool("test-device-save")
    try:
        slots = [pool.acquire(1 << 16) for _ in range(3)]
        maps = MappingCache(capacity=2, on_drop=dropped.append)
        first = maps.get(slots[0].path, slots[0].capacity)
        maps.get(slots[1].path, slots[1].capacity)
        maps.get(slots[2].path, slots[2].capacity)  # over capacity: the oldest goes
        assert [d.data_ptr() for d in dropped] == [first.data_ptr()]
        pool.discard(slots[1])
        maps.get(slots[0].path, slots[0].capacity)  # a miss drops unlinked files
        assert len(dropped) == 2
    finally:
        pool.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the side stream and registered slot); the CPU twin above runs the same steps")
@pytest.mark.parametrize("name", ["auto", "int8"])
def test_cuda_side_stream_writes_what_the_cpu_path_writes(name):
    payload, scales, want_payload, want_scales = saved("cuda", name, per_layer=True)
    if name == "auto":
        assert torch.equal(payload.view(torch.uint8), want_payload.view(torch.uint8))
    else:  # the GPU's float rounding may differ in the last bit of a scale
        torch.testing.assert_close(scales, want_scales)
        assert (payload.view(torch.int8).int() - want_payload.view(torch.int8).int()).abs().max() <= 1
