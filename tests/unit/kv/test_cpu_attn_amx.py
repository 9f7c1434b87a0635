"""Interchange <-> CPU_ATTN pages on vLLM's AMX path (kv/cpu_attn_amx.py).

Checked against the layout's definition (runs on every CPU) and, where the CPU
has AMX tiles, against the pages vLLM's own ``cpu_attn_reshape_and_cache``
writes for its "amx" path, at every block size that path takes.
"""

import importlib.util

import pytest
import torch

from hetserve.kv import cpu_attn_amx

H, D, BLOCKS = 2, 64, 16
needs_numba = pytest.mark.skipif(importlib.util.find_spec("numba") is None, reason="numba is not installed")


@pytest.fixture(params=["kernel", "torch"])
def path(request, monkeypatch):
    """Each test runs through the numba kernel and through the torch fallback."""
    if request.param == "kernel":
        if importlib.util.find_spec("numba") is None:
            pytest.skip("numba is not installed (the torch path runs in the other case)")
        assert cpu_attn_amx._kernel(32) is not None
    else:
        monkeypatch.setattr(cpu_attn_amx, "_kernel", lambda *_: None)
    return request.param


def position(t: int, d: int, bs: int, half: int) -> int:
    """Where token t's dim d sits in a page half (the layout's definition, per element)."""
    if half == 0:  # K: [bs/16][D/2][16][2]
        return ((t // 16) * (D // 2) + d // 2) * 32 + (t % 16) * 2 + d % 2
    return ((d // 16) * (bs // 2) + t // 2) * 32 + (d % 16) * 2 + t % 2  # V: [D/16][bs/2][16][2]


@pytest.mark.parametrize("bs", [32, 128])
@pytest.mark.parametrize("num_tokens", [1, 2, 15, 17, 31, 32, 33, 100, 128, 129, 3 * 128 + 5])
def test_scatter_places_each_value_where_the_layout_says(bs, num_tokens, path):
    torch.manual_seed(num_tokens)
    kv = torch.randn(1, 2, H, num_tokens, D).bfloat16()
    ids = torch.randperm(BLOCKS)[: -(-num_tokens // bs)].tolist()
    layers = [torch.full((BLOCKS, H, bs, 2 * D), -7.0, dtype=torch.bfloat16)]
    cpu_attn_amx.scatter(kv, layers, ids)
    for t in range(0, num_tokens, 3):
        for h in range(H):
            page = layers[0][ids[t // bs], h].reshape(2, bs * D)
            for d in range(0, D, 5):
                for half in (0, 1):
                    assert page[half, position(t % bs, d, bs, half)] == kv[0, half, h, t, d]
    out = torch.empty_like(kv)
    assert torch.equal(cpu_attn_amx.gather(layers, ids, out), kv)
    # a partial block keeps what its other slots held
    if num_tokens % bs:
        page = layers[0][ids[-1], 0].reshape(2, bs * D)
        t = bs - 1
        assert page[0, position(t, 0, bs, 0)] == -7.0 and page[1, position(t, 0, bs, 1)] == -7.0


def random_bits(*shape):
    return torch.randint(-(2**15), 2**15, shape, dtype=torch.int16).view(torch.bfloat16)


@needs_numba
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("num_tokens", [1, 16, 47, 64, 65, 3 * 64 + 33])
def test_kernel_matches_the_torch_path_byte_for_byte(num_tokens, threads, monkeypatch):
    """Every bit pattern (NaNs included), 3 layers split over threads, stale slots kept."""
    bs, layers_n = 64, 3
    torch.manual_seed(num_tokens)
    kv = random_bits(layers_n, 2, H, num_tokens, D)
    ids = torch.randperm(BLOCKS)[: -(-num_tokens // bs)].tolist()
    layers = [random_bits(BLOCKS, H, bs, 2 * D) for _ in range(layers_n)]
    expected = [layer.clone() for layer in layers]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        cpu_attn_amx.scatter(kv, layers, ids)
        out = random_bits(*kv.shape)
        cpu_attn_amx.gather(layers, ids, out)
    finally:
        torch.set_num_threads(previous)
    with monkeypatch.context() as m:
        m.setattr(cpu_attn_amx, "_kernel", lambda *_: None)
        cpu_attn_amx.scatter(kv, expected, ids)
    for got, want in zip(layers, expected):
        assert torch.equal(got.view(torch.int16), want.view(torch.int16))
    assert torch.equal(out.view(torch.int16), kv.view(torch.int16))


def test_head_dims_amx_cannot_split_are_refused():
    with pytest.raises(ValueError, match="multiples of 16"):
        cpu_attn_amx.scatter(torch.zeros(1, 2, H, 5, 24).bfloat16(), [torch.zeros(BLOCKS, H, 32, 48).bfloat16()], [0])


@pytest.mark.skipif(not torch.cpu._is_amx_tile_supported(), reason="needs a CPU with AMX tiles (vLLM's amx path); the definition test above runs everywhere")
@pytest.mark.parametrize("bs", [32, 64, 128, 256])
def test_vllms_amx_pages_convert_both_ways(bs, path):
    from vllm import _custom_ops as ops

    from hetserve.kv import cpu_attn

    assert cpu_attn.converter_for(torch.bfloat16, bs, D) == (cpu_attn_amx, "amx")
    for num_tokens in (1, bs - 1, bs, bs + 1, 3 * bs + 5):
        torch.manual_seed(num_tokens)
        key, value = (torch.randn(num_tokens, H, D).bfloat16() for _ in range(2))
        ids = torch.randperm(BLOCKS)[: -(-num_tokens // bs)].tolist()
        cache = torch.zeros(BLOCKS, H, bs, 2 * D, dtype=torch.bfloat16)
        halves = cache.view(BLOCKS, H, 2 * bs, D).chunk(2, dim=2)
        slots = torch.tensor([ids[t // bs] * bs + t % bs for t in range(num_tokens)])
        ops.cpu_attn_reshape_and_cache(key, value, *halves, slots, "amx")
        kv = torch.stack([key.transpose(0, 1), value.transpose(0, 1)])[None]
        assert torch.equal(cpu_attn_amx.gather([cache], ids, torch.empty_like(kv)), kv)
        ours = [torch.zeros_like(cache)]
        cpu_attn_amx.scatter(kv, ours, ids)
        assert torch.equal(ours[0], cache)
