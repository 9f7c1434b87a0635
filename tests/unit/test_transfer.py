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
