"""What every paged layout shares: vLLM's logical per-layer cache
``[num_blocks, kv_heads, block_size, 2 * head_dim]`` (CPU_ATTN and the GPU
backends alike; they differ inside a page), runs of consecutive blocks, and the
checks before a copy."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch


def runs(block_ids: Sequence[int], num_tokens: int, bs: int) -> Iterator[tuple[int, int, int, int]]:
    """Yield (first_token, first_block, num_blocks, tokens_in_last_block) per run of consecutive ids."""
    full, j = num_tokens // bs, 0
    while j < full:
        start = j
        while j + 1 < full and block_ids[j + 1] == block_ids[j] + 1:
            j += 1
        j += 1
        yield start * bs, block_ids[start], j - start, bs
    if num_tokens % bs:  # the partial last block ends its own run
        yield full * bs, block_ids[full], 1, num_tokens % bs


def check(kv: torch.Tensor, layers: Sequence[torch.Tensor], block_ids: Sequence[int]) -> None:
    """Refuse KV and pages that do not fit each other (shapes, dtype, block ids).

    ``kv``: [L, 2, H, T, D]; ``layers[i]``: [num_blocks, H, block_size, 2D], any strides.
    """
    # A leading-token slice of a contiguous interchange tensor is accepted too.
    if kv.dim() != 5 or kv.shape[1] != 2 or kv.stride(4) != 1 or kv.stride(3) != kv.shape[4]:
        raise ValueError(f"interchange KV must be [L, 2, H, T, D] with dense tokens, got {tuple(kv.shape)}")
    if len(layers) != kv.shape[0]:
        raise ValueError(f"interchange KV has {kv.shape[0]} layers, the cache has {len(layers)}")
    _, heads, block_size, two_d = layers[0].shape
    if heads != kv.shape[2] or two_d != 2 * kv.shape[4]:
        raise ValueError(
            f"cache pages {tuple(layers[0].shape[1:])} do not fit KV heads={kv.shape[2]}, head_dim={kv.shape[4]}"
        )
    if layers[0].dtype != kv.dtype:
        raise ValueError(f"cache dtype {layers[0].dtype} differs from KV dtype {kv.dtype}")
    needed = -(-kv.shape[3] // block_size)
    if len(block_ids) < needed:
        raise ValueError(f"{kv.shape[3]} tokens need {needed} blocks, got {len(block_ids)}")
    # The kernel does not bounds-check, and a negative id would slice from the end.
    if needed and not 0 <= min(block_ids[:needed]) <= max(block_ids[:needed]) < min(x.shape[0] for x in layers):
        raise ValueError(f"block ids {list(block_ids[:needed])} out of range for {layers[0].shape[0]} blocks")
