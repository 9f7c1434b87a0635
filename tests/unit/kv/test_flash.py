"""Interchange <-> the GPU backends' pages (FlashAttention, FlashInfer, ...), on CPU tensors.

The pages are laid out as vLLM 0.32 lays them out: logical per layer
``[num_blocks, kv_heads, block_size, 2 * head_dim]``, physical order one of
``KVCacheLayout``'s stride permutations of ``[L, B, H, N, C]`` (imported from
vLLM), and a token written where ``reshape_and_cache_flash`` writes it: slot
``s`` is block ``s // block_size``, offset ``s % block_size`` of
``kv_cache.transpose(1, 2).split(head_dim, dim=-1)`` (flash_attn.py). The CUDA
kernel itself cannot run here; ``vllm_writes`` is that definition.
"""

import pytest
import torch
from vllm.v1.kv_cache_layout import KVCacheLayout

from hetserve.kv import cpu_attn, flash

L, H, D, BLOCKS = 3, 2, 8, 24


def layers_in(layout: KVCacheLayout, block_size: int, dtype=torch.float32, num_blocks=BLOCKS):
    """Each layer's logical [B, H, N, 2D] view of one storage in ``layout``'s physical order."""
    logical = (L, num_blocks, H, block_size, 2 * D)
    order = layout.stride_order
    storage = torch.full([logical[i] for i in order], -7.0, dtype=dtype)
    view = storage.permute([order.index(i) for i in range(5)])  # back to [L, B, H, N, C]
    assert tuple(view.shape) == logical
    return [view[i] for i in range(L)]


def vllm_writes(layer, key, value, slots):
    """Where vLLM's reshape_and_cache_flash puts token t: ``key``/``value`` [T, H, D]."""
    key_cache, value_cache = layer.transpose(1, 2).split(D, dim=-1)  # [B, N, H, D] each
    bs = layer.shape[2]
    for t, slot in enumerate(slots):
        key_cache[slot // bs, slot % bs] = key[t]
        value_cache[slot // bs, slot % bs] = value[t]


def slots_for(ids, num_tokens, bs):
    return [ids[t // bs] * bs + t % bs for t in range(num_tokens)]


@pytest.mark.parametrize("layout", list(KVCacheLayout))
@pytest.mark.parametrize("block_size", [16, 32, 64])
def test_both_directions_match_vllms_pages(layout, block_size):
    for num_tokens in (1, block_size - 1, block_size, block_size + 1, 3 * block_size + 5):
        torch.manual_seed(num_tokens)
        kv = torch.randn(L, 2, H, num_tokens, D)
        ids = torch.randperm(BLOCKS)[: -(-num_tokens // block_size)].tolist()
        want = layers_in(layout, block_size)
        for i, layer in enumerate(want):
            vllm_writes(layer, kv[i, 0].transpose(0, 1), kv[i, 1].transpose(0, 1), slots_for(ids, num_tokens, block_size))
        ours = layers_in(layout, block_size)
        flash.scatter(kv, ours, ids)
        for got, expected in zip(ours, want):
            assert torch.equal(got, expected)  # untouched slots (-7) included
        assert torch.equal(flash.gather(want, ids, torch.empty_like(kv)), kv)


def test_contiguous_runs_and_a_leading_token_slice():
    layers = layers_in(KVCacheLayout.LBNHC, 16)
    big = torch.randn(L, 2, H, 100, D)
    kv = big[:, :, :, :70]
    flash.scatter(kv, layers, list(range(3, 8)))  # one run of five blocks
    out = torch.zeros(L, 2, H, 100, D)
    flash.gather(layers, list(range(3, 8)), out[:, :, :, :70])
    assert torch.equal(out[:, :, :, :70], kv) and not out[:, :, :, 70:].any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_prefill_to_cpu_decode_through_the_interchange_tensor(dtype):
    """A FlashAttention producer (block 16) feeds a CPU_ATTN consumer (block 128), and back."""
    torch.manual_seed(0)
    num_tokens = 300
    kv = torch.randn(L, 2, H, num_tokens, D).to(dtype)
    gpu = layers_in(KVCacheLayout.LBNHC, 16, dtype)
    gpu_ids = torch.randperm(BLOCKS)[:19].tolist()
    flash.scatter(kv, gpu, gpu_ids)
    slot = flash.gather(gpu, gpu_ids, torch.empty_like(kv))  # what prefill's worker writes
    cpu = [torch.zeros(4, H, 128, 2 * D, dtype=dtype) for _ in range(L)]
    cpu_attn.scatter(slot, cpu, [2, 0, 3])  # what decode's worker reads
    assert torch.equal(cpu_attn.gather(cpu, [2, 0, 3], torch.empty_like(kv)), kv)
    again = layers_in(KVCacheLayout.LHBNC, 32, dtype)
    flash.scatter(cpu_attn.gather(cpu, [2, 0, 3], torch.empty_like(kv)), again, list(range(10)))
    assert torch.equal(flash.gather(again, list(range(10)), torch.empty_like(kv)), kv)


@pytest.mark.parametrize(
    "kv_shape, ids, message",
    [
        ((L, 2, H, 40, D), [0, 1], "need 3 blocks"),
        ((L + 1, 2, H, 10, D), [0], "layers"),
        ((L, 2, H + 1, 10, D), [0], "do not fit"),
        ((L, 2, H, 20, D), [0, BLOCKS], "out of range"),
    ],
)
def test_mismatches_are_refused(kv_shape, ids, message):
    with pytest.raises(ValueError, match=message):
        flash.scatter(torch.zeros(kv_shape), layers_in(KVCacheLayout.LBHNC, 16), ids)


def test_the_connector_picks_the_converter_of_its_backend():
    from hetserve.kv.connector import converter

    assert converter("CPU_ATTN") is cpu_attn
    for name in ("FLASH_ATTN", "FLASHINFER", "FLEX_ATTENTION", "TRITON_ATTN"):
        assert converter(name) is flash
    with pytest.raises(ValueError, match="no converter for the FLASHMLA attention backend"):
        converter("FLASHMLA")
