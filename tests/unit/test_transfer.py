"""Compression in transit (kv/transfer.py): round trips and the stated error bounds."""

from __future__ import annotations

import pytest
import torch

from hetserve.kv import transfer


def kv(dtype=torch.float32, tokens=37, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 2, 2, tokens, 64, generator=g) * torch.rand(3, 2, 2, tokens, 1, generator=g) * 8
    x[0, 0, 0, 0] = 0.0  # an all-zero token: its scale must not divide by zero
    x[1, 1, 1, 5, 7] = 1e4  # an outlier: costs only its own token's precision
    return x.to(dtype)


@pytest.mark.parametrize("model_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", transfer.TRANSFER_DTYPES)
def test_round_trip_within_the_stated_bound(model_dtype, name):
    x = kv(model_dtype)
    payload, scales = transfer.encode(x, name)
    assert payload.dtype == transfer.wire_dtype(name, model_dtype)
    assert (scales is None) == (name not in transfer.SCALED)
    out = torch.empty_like(x)
    transfer.decode_into(payload, scales, name, out)
    ref, got = x.float(), out.float()
    if name == "auto" or transfer.CASTS.get(name) == model_dtype:
        assert torch.equal(out, x)  # exact
    elif name in transfer.CASTS:
        assert torch.equal(out, x.to(transfer.CASTS[name]).to(model_dtype))
    else:
        s = scales.unsqueeze(-1)
        bound = s / 2 if name == "int8" else ref.abs() / 16 + s * 2**-10
        # plus the model dtype's own rounding of the decoded value
        bound = bound + ref.abs() * torch.finfo(model_dtype).eps
        assert bool(((got - ref).abs() <= bound).all()), (got - ref).abs().max()
        assert torch.equal(out[0, 0, 0, 0], torch.zeros_like(out[0, 0, 0, 0]))


def test_int8_moves_a_quarter_of_float32_plus_its_scales():
    x = kv(torch.float32, tokens=128)
    payload, scales = transfer.encode(x, "int8")
    moved = payload.numel() * payload.element_size() + scales.numel() * scales.element_size()
    assert moved / (x.numel() * x.element_size()) == pytest.approx(0.25 + 1 / 64)


def test_unknown_dtype_and_missing_scales_are_named():
    with pytest.raises(ValueError, match="unknown KV transfer dtype 'int4'"):
        transfer.encode(kv(), "int4")
    payload, _ = transfer.encode(kv(), "int8")
    with pytest.raises(ValueError, match="int8 needs its scales"):
        transfer.decode_into(payload, None, "int8", torch.empty(kv().shape))


# ---- the workers' coding: encode as part of the gather, decode as part of the scatter

from hetserve.kv import cpu_attn, flash  # noqa: E402
from hetserve.kv.slots import HEADER_BYTES  # noqa: E402

LAYERS, HEADS, HEAD_DIM, BLOCKS = 5, 2, 16, 12  # 5 layers: groups of 2 leave one over


def pages(converter, dtype, block_size, seed):
    """A paged cache ([blocks, H, bs, 2D] per layer) holding random KV at random block ids."""
    g = torch.Generator().manual_seed(seed)
    layers = [(torch.randn(BLOCKS, HEADS, block_size, 2 * HEAD_DIM, generator=g) * 4).to(dtype) for _ in range(LAYERS)]
    return layers, torch.randperm(BLOCKS, generator=g).tolist()


def slot_views(name, dtype, shape):
    flat = torch.zeros(HEADER_BYTES + transfer.encoded_nbytes(name, dtype, shape), dtype=torch.uint8)
    return transfer.views(flat, name, dtype, shape)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("converter,block_size", [(cpu_attn, 128), (cpu_attn, 32), (flash, 16)])
@pytest.mark.parametrize("model_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", transfer.TRANSFER_DTYPES)
def test_worker_coding_equals_the_stub_coding_of_the_exact_kv(name, model_dtype, converter, block_size, threads):
    """gather_encoded == encode(gather); scatter_decoded writes decode(payload), bit for bit."""
    tokens = 2 * block_size + 3
    layers, ids = pages(converter, model_dtype, block_size, seed=tokens)
    shape = (LAYERS, 2, HEADS, tokens, HEAD_DIM)
    exact = converter.gather(layers, ids, torch.empty(shape, dtype=model_dtype))
    want_payload, want_scales = transfer.encode(exact, name)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        payload, scales = slot_views(name, model_dtype, shape)
        transfer.gather_encoded(converter, layers, ids, payload, scales, name)
        assert torch.equal(payload.view(torch.uint8), want_payload.view(torch.uint8))
        assert (scales is None) == (want_scales is None)
        if scales is not None:
            assert torch.equal(scales, want_scales)
        # The consumer: only the first `count` tokens (a load leaves the last to compute).
        count = tokens - 1
        fresh, _ = pages(converter, model_dtype, block_size, seed=99)
        transfer.scatter_decoded(
            converter, payload[:, :, :, :count], None if scales is None else scales[:, :, :, :count], name, fresh, ids
        )
    finally:
        torch.set_num_threads(previous)
    want = torch.empty(shape, dtype=model_dtype)
    transfer.decode_into(want_payload, want_scales, name, want)
    got = converter.gather(fresh, ids, torch.empty(shape, dtype=model_dtype)[:, :, :, :count].contiguous())
    assert torch.equal(got, want[:, :, :, :count])
    if transfer.direct(name, model_dtype):
        assert torch.equal(got, exact[:, :, :, :count])


def test_layer_by_layer_coding_equals_the_whole():
    """kv_save "layer" encodes one layer at a time into the slot's slices."""
    layers, ids = pages(cpu_attn, torch.bfloat16, 128, seed=1)
    shape = (LAYERS, 2, HEADS, 200, HEAD_DIM)
    whole, whole_scales = slot_views("int8", torch.bfloat16, shape)
    transfer.gather_encoded(cpu_attn, layers, ids, whole, whole_scales, "int8")
    each, each_scales = slot_views("int8", torch.bfloat16, shape)
    for i in range(LAYERS):
        transfer.gather_encoded(cpu_attn, layers[i : i + 1], ids, each[i : i + 1], each_scales[i : i + 1], "int8")
    assert torch.equal(each, whole) and torch.equal(each_scales, whole_scales)


def test_an_encoded_slot_is_smaller_and_its_scales_follow_the_payload():
    shape = (32, 2, 8, 512, 128)
    exact = transfer.encoded_nbytes("auto", torch.bfloat16, shape)
    assert exact == 32 * 2 * 8 * 512 * 128 * 2
    assert transfer.encoded_nbytes("int8", torch.bfloat16, shape) == exact // 2 + 32 * 2 * 8 * 512 * 4
    payload, scales = slot_views("fp8_e4m3", torch.bfloat16, shape)
    assert payload.dtype == torch.uint8 and scales.dtype == torch.float32
    assert scales.data_ptr() >= payload.data_ptr() + payload.numel() and scales.data_ptr() % 64 == payload.data_ptr() % 64


def test_worker_coding_refuses_missing_scales_and_wrong_layers():
    layers, ids = pages(cpu_attn, torch.float32, 128, seed=2)
    payload, _ = slot_views("int8", torch.float32, (LAYERS, 2, HEADS, 10, HEAD_DIM))
    with pytest.raises(ValueError, match="int8 needs its scales"):
        transfer.gather_encoded(cpu_attn, layers, ids, payload, None, "int8")
    with pytest.raises(ValueError, match="4 layers, the cache has 5"):
        transfer.scatter_decoded(cpu_attn, payload[:4], None, "float16", layers, ids)
