"""Interchange <-> CPU_ATTN paged cache, checked against a per-token definition."""

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
