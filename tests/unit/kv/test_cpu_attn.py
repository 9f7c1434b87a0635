"""Interchange <-> CPU_ATTN paged cache, checked against a per-token definition."""

import importlib.util
import os
import threading

import pytest
import torch

from hetserve.kv import cpu_attn

L, H, D, BLOCKS = 3, 2, 8, 16
BS = cpu_attn.BLOCK_SIZE


def make_layers(dtype=torch.float32):
    # [num_blocks, H, block_size, 2 * D], filled so stale slots are recognisable
    return [torch.full((BLOCKS, H, BS, 2 * D), -7.0, dtype=dtype) for _ in range(L)]


def slot(layer, block, head, pos):
    """K and V of one token, read by the layout's definition (K transposed)."""
    page = layer[block, head].reshape(-1)  # block_size * 2D values
    k = page[: D * BS].view(D, BS)[:, pos]
    v = page[D * BS :].view(BS, D)[pos]
    return k, v


def block_ids_for(num_tokens, contiguous):
    n = -(-num_tokens // BS)
    ids = list(range(2, 2 + n)) if contiguous else list(torch.randperm(BLOCKS)[:n].tolist())
    return ids


@pytest.mark.parametrize("num_tokens", [1, 127, 128, 129, 3 * BS + 5, 4 * BS])
@pytest.mark.parametrize("contiguous", [True, False])
def test_scatter_places_each_token_where_the_layout_says(num_tokens, contiguous):
    torch.manual_seed(num_tokens)
    kv = torch.randn(L, 2, H, num_tokens, D)
    layers, ids = make_layers(), block_ids_for(num_tokens, contiguous)
    cpu_attn.scatter(kv, layers, ids)
    for layer_index, layer in enumerate(layers):
        for t in range(0, num_tokens, 7):
            for h in range(H):
                k, v = slot(layer, ids[t // BS], h, t % BS)
                assert torch.equal(k, kv[layer_index, 0, h, t])
                assert torch.equal(v, kv[layer_index, 1, h, t])


@pytest.mark.parametrize("num_tokens", [1, 127, 128, 129, 3 * BS + 5])
@pytest.mark.parametrize("contiguous", [True, False])
def test_round_trip_is_exact_and_touches_only_the_prompt(num_tokens, contiguous):
    torch.manual_seed(1)
    kv = torch.randn(L, 2, H, num_tokens, D)
    layers, ids = make_layers(), block_ids_for(num_tokens, contiguous)
    before = [layer.clone() for layer in layers]
    cpu_attn.scatter(kv, layers, ids)
    out = torch.empty_like(kv)
    cpu_attn.gather(layers, ids, out)
    assert torch.equal(out, kv)
    # Slots past the last token and blocks not listed keep what they held.
    for block in set(range(BLOCKS)) - set(ids):
        assert torch.equal(layers[0][block], before[0][block])
    tail = num_tokens % BS
    if tail:
        k, v = slot(layers[0], ids[-1], 0, tail)
        assert (k == -7).all() and (v == -7).all()


def test_gather_reads_a_prefix_of_a_longer_buffer():
    kv = torch.randn(L, 2, H, 300, D)
    layers, ids = make_layers(), block_ids_for(300, contiguous=False)
    cpu_attn.scatter(kv, layers, ids)
    out = torch.empty(L, 2, H, 200, D)
    cpu_attn.gather(layers, ids, out)
    assert torch.equal(out, kv[:, :, :, :200])
    # and a leading-token slice loads only those tokens
    fresh = make_layers()
    cpu_attn.scatter(kv[:, :, :, :200], fresh, ids)
    out2 = torch.empty(L, 2, H, 200, D)
    cpu_attn.gather(fresh, ids, out2)
    assert torch.equal(out2, kv[:, :, :, :200])


def test_bfloat16_round_trip():
    kv = torch.randn(L, 2, H, 130, D).to(torch.bfloat16)
    layers, ids = make_layers(torch.bfloat16), [5, 9]
    cpu_attn.scatter(kv, layers, ids)
    out = torch.empty_like(kv)
    assert torch.equal(cpu_attn.gather(layers, ids, out), kv)


@pytest.mark.parametrize(
    "kv_shape, ids, message",
    [
        ((L, 2, H, 300, D), [0, 1], "need 3 blocks"),
        ((L + 1, 2, H, 10, D), [0], "layers"),
        ((L, 2, H + 1, 10, D), [0], "do not fit"),
        ((L, 3, H, 10, D), [0], r"\[L, 2, H, T, D\]"),
    ],
)
def test_mismatches_are_refused(kv_shape, ids, message):
    with pytest.raises(ValueError, match=message):
        cpu_attn.scatter(torch.zeros(kv_shape), make_layers(), ids)


def test_dtype_mismatch_is_refused():
    with pytest.raises(ValueError, match="dtype"):
        cpu_attn.scatter(torch.zeros(L, 2, H, 4, D, dtype=torch.float16), make_layers(), [0])


# --- the numba kernel (2- and 4-byte dtypes), checked against the pure-torch path --------------

needs_numba = pytest.mark.skipif(importlib.util.find_spec("numba") is None, reason="numba is not installed")


def random_bits(*shape, dtype=torch.bfloat16):
    # every bit pattern (NaNs, infinities, denormals): the converters move bytes, not values
    halves = dtype.itemsize // 2
    return torch.randint(-(2**15), 2**15, (*shape[:-1], shape[-1] * halves), dtype=torch.int16).view(dtype)


def bits(t):
    return t.view(torch.int16)


@pytest.fixture
def torch_only(monkeypatch):
    """Run a callable with the numba kernel switched off."""

    def run(fn, *args):
        with monkeypatch.context() as m:
            m.setattr(cpu_attn, "_kernel", lambda *_: None)
            return fn(*args)

    return run


@needs_numba
@pytest.mark.parametrize("num_tokens", [1, 127, 128, 129, 3 * BS + 5, 4 * BS])
@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("head_dim", [8, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kernel_matches_the_torch_path_byte_for_byte(num_tokens, contiguous, head_dim, dtype, torch_only):
    torch.manual_seed(num_tokens + head_dim)
    kv = random_bits(L, 2, H, num_tokens, head_dim, dtype=dtype)
    ids = block_ids_for(num_tokens, contiguous)
    layers = [random_bits(BLOCKS, H, BS, 2 * head_dim, dtype=dtype) for _ in range(L)]
    expected = [layer.clone() for layer in layers]
    assert cpu_attn._numba_copy(kv, layers, ids, to_pages=True)
    torch_only(cpu_attn.scatter, kv, expected, ids)
    for got, want in zip(layers, expected):
        assert torch.equal(bits(got), bits(want))  # stale slots and unlisted blocks included
    out = random_bits(*kv.shape, dtype=dtype)
    cpu_attn.gather(layers, ids, out)
    assert torch.equal(bits(out), bits(kv))
    via_torch = torch_only(cpu_attn.gather, layers, ids, torch.empty_like(kv))
    assert torch.equal(bits(via_torch), bits(kv))


@needs_numba
def test_kernel_places_each_token_where_the_layout_says():
    num_tokens = 2 * BS + 3
    kv = random_bits(L, 2, H, num_tokens, D)
    layers, ids = [random_bits(BLOCKS, H, BS, 2 * D) for _ in range(L)], block_ids_for(num_tokens, False)
    cpu_attn.scatter(kv, layers, ids)
    for layer_index, layer in enumerate(layers):
        for t in range(num_tokens):
            for h in range(H):
                k, v = slot(layer, ids[t // BS], h, t % BS)
                assert torch.equal(bits(k), bits(kv[layer_index, 0, h, t]))
                assert torch.equal(bits(v), bits(kv[layer_index, 1, h, t]))


@needs_numba
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_with_a_leading_token_slice_both_ways(threads):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        big = random_bits(L, 2, H, 300, D)
        kv = big[:, :, :, :200]  # [L, 2, H, 200, D], not contiguous
        layers, ids = [random_bits(BLOCKS, H, BS, 2 * D) for _ in range(L)], block_ids_for(200, False)
        cpu_attn.scatter(kv, layers, ids)
        out_big = random_bits(L, 2, H, 300, D)
        untouched = out_big[:, :, :, 200:].clone()
        cpu_attn.gather(layers, ids, out_big[:, :, :, :200])
        assert torch.equal(bits(out_big[:, :, :, :200]), bits(kv))
        assert torch.equal(bits(out_big[:, :, :, 200:]), bits(untouched))
    finally:
        torch.set_num_threads(previous)


@needs_numba
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_float16_and_float32_go_through_the_kernel_too(dtype):
    kv = random_bits(L, 2, H, 130, D, dtype=dtype)
    layers = [random_bits(BLOCKS, H, BS, 2 * D, dtype=dtype) for _ in range(L)]
    assert cpu_attn._numba_copy(kv, layers, [5, 9], to_pages=True)
    out = torch.empty_like(kv)
    assert torch.equal(bits(cpu_attn.gather(layers, [5, 9], out)), bits(kv))


@needs_numba
@pytest.mark.parametrize("num_tokens", [130, 2 * BS])
def test_kernel_takes_unaligned_tensors(num_tokens, torch_only):
    # KV starting 2 bytes past a 64-byte boundary: no streaming stores there, the same bytes
    storage = random_bits(L * 2 * H * num_tokens * D + 1)
    kv = storage[1:].view(L, 2, H, num_tokens, D)
    layers = [random_bits(BLOCKS, H, BS, 2 * D) for _ in range(L)]
    expected = [layer.clone() for layer in layers]
    assert cpu_attn._numba_copy(kv, layers, [5, 9], to_pages=True)
    torch_only(cpu_attn.scatter, kv, expected, [5, 9])
    assert all(torch.equal(bits(got), bits(want)) for got, want in zip(layers, expected))
    out = random_bits(L * 2 * H * num_tokens * D + 1)[1:].view(L, 2, H, num_tokens, D)
    assert cpu_attn._numba_copy(out, layers, [5, 9], to_pages=False)
    assert torch.equal(bits(out), bits(kv))


def test_inputs_the_kernel_cannot_take_fall_back_to_torch():
    # 8-byte elements, and head dims that are not a multiple of the kernel's 8x8 tiles
    assert not cpu_attn._numba_copy(torch.zeros(L, 2, H, 4, D, dtype=torch.float64), make_layers(torch.float64), [0], True)
    kv = torch.randn(L, 2, H, 130, 12).to(torch.bfloat16)
    layers = [torch.zeros(BLOCKS, H, BS, 24, dtype=torch.bfloat16) for _ in range(L)]
    assert not cpu_attn._numba_copy(kv, layers, [5, 9], to_pages=True)
    cpu_attn.scatter(kv, layers, [5, 9])
    out = torch.empty_like(kv)
    assert torch.equal(bits(cpu_attn.gather(layers, [5, 9], out)), bits(kv))


@pytest.mark.parametrize("ids", [[0, BLOCKS], [-1, 2]])
def test_block_ids_out_of_range_are_refused(ids):
    for dtype in (torch.float32, torch.bfloat16):
        with pytest.raises(ValueError, match="out of range"):
            cpu_attn.scatter(torch.zeros(L, 2, H, 200, D, dtype=dtype), make_layers(dtype), ids)


# --- every block size, against vLLM's own writer -----------------------------------------------


def vllm_writes(key, value, block_size, block_ids, num_blocks):
    """The cache vLLM's CPU attention would hold after storing ``key``/``value`` ([T, H, D])."""
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    tokens, heads, head_dim = key.shape
    cache = torch.zeros(num_blocks, heads, block_size, 2 * head_dim, dtype=key.dtype)
    halves = cache.view(num_blocks, heads, 2 * block_size, head_dim).chunk(2, dim=2)  # as CPUAttentionBackendImpl does
    slots = torch.tensor([block_ids[t // block_size] * block_size + t % block_size for t in range(tokens)])
    ops.cpu_attn_reshape_and_cache(key, value, *halves, slots, _get_attn_isa(key.dtype, block_size, head_dim))
    return cache


@pytest.mark.parametrize("block_size", [16, 32, 64, 128, 256])
@pytest.mark.parametrize("dtype, head_dim", [(torch.bfloat16, 64), (torch.float32, 64), (torch.float16, 80)])
def test_both_directions_match_vllms_own_pages_at_every_block_size(block_size, dtype, head_dim):
    heads, num_blocks = 2, 8
    converter, _ = cpu_attn.converter_for(dtype, block_size, head_dim)  # this CPU's kernel path's layout
    for num_tokens in (1, block_size - 1, block_size, block_size + 1, 3 * block_size + 5):
        torch.manual_seed(num_tokens)
        key, value = (torch.randn(num_tokens, heads, head_dim).to(dtype) for _ in range(2))
        ids = torch.randperm(num_blocks)[: -(-num_tokens // block_size)].tolist()
        want_pages = vllm_writes(key, value, block_size, ids, num_blocks)
        kv = torch.stack([key.transpose(0, 1), value.transpose(0, 1)])[None]  # [1, 2, H, T, D]
        ours = [torch.zeros_like(want_pages)]
        converter.scatter(kv, ours, ids)
        assert torch.equal(ours[0], want_pages)
        got = converter.gather([want_pages], ids, torch.empty_like(kv))
        assert torch.equal(got, kv)


@pytest.mark.parametrize("producer, consumer", [(128, 32), (32, 256), (16, 64)])
def test_producer_and_consumer_may_use_different_block_sizes(producer, consumer):
    torch.manual_seed(producer + consumer)
    num_tokens = 300
    kv = random_bits(L, 2, H, num_tokens, 64)
    produced = [random_bits(-(-num_tokens // producer) + 2, H, producer, 128) for _ in range(L)]
    consumed = [random_bits(-(-num_tokens // consumer) + 2, H, consumer, 128) for _ in range(L)]
    p_ids = list(range(produced[0].shape[0]))[::-1][: -(-num_tokens // producer)]
    c_ids = list(range(1, 1 + -(-num_tokens // consumer)))
    cpu_attn.scatter(kv, produced, p_ids)
    interchange = cpu_attn.gather(produced, p_ids, torch.empty_like(kv))  # what crosses between them
    cpu_attn.scatter(interchange, consumed, c_ids)
    assert torch.equal(bits(cpu_attn.gather(consumed, c_ids, torch.empty_like(kv))), bits(kv))


@pytest.mark.parametrize("block_size", [32, 128])
def test_converter_for_accepts_vllms_kernel_path(block_size):
    from hetserve.kv import cpu_attn_amx

    converter, isa = cpu_attn.converter_for(torch.bfloat16, block_size, 64)
    assert isa in ("vec", "vec16", "amx", "neon", "vsx", "vxe", "rvv")
    assert converter is (cpu_attn_amx if isa == "amx" else cpu_attn)


def test_converter_for_refuses_pages_laid_out_otherwise(monkeypatch):
    from vllm import _custom_ops as ops

    def untransposed(key, value, key_cache, value_cache, slots, isa, **_):  # K as [block_size, head_dim]
        for t, slot in enumerate(slots.tolist()):
            key_cache[slot // key_cache.shape[2], :, slot % key_cache.shape[2]] = key[t]
            value_cache[slot // value_cache.shape[2], :, slot % value_cache.shape[2]] = value[t]

    monkeypatch.setattr(ops, "cpu_attn_reshape_and_cache", untransposed)
    with pytest.raises(ValueError, match="lays out its KV pages differently"):
        cpu_attn.converter_for(torch.float32, 32, 64)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to pin two threads apart")
def test_pool_threads_join_the_pinned_teams_other_cores():
    """As in vLLM's CPU worker: the caller pinned to one core, a team thread to another."""
    first, second = sorted(os.sched_getaffinity(0))[:2]
    pinned, done, seen = threading.Event(), threading.Event(), {}

    def team_thread():
        os.sched_setaffinity(0, {second})
        pinned.set()
        done.wait()

    def caller():
        seen["unpinned"] = cpu_attn._team_cores()
        os.sched_setaffinity(0, {first})
        pinned.wait()
        seen["cores"] = cpu_attn._team_cores()
        pool = cpu_attn._pool.__wrapped__(1)  # a fresh pool, not the cached one
        seen["pool"] = pool.submit(os.sched_getaffinity, 0).result()
        pool.shutdown()

    threads = [threading.Thread(target=team_thread), threading.Thread(target=caller)]
    for t in threads:
        t.start()
    threads[1].join()
    done.set()
    threads[0].join()
    assert seen == {"unpinned": [], "cores": [second], "pool": {second}}
