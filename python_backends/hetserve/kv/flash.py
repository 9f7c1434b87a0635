"""Converters between the interchange format and the GPU backends' paged cache.

vLLM 0.32's FlashAttention, FlashInfer, FlexAttention and Triton attention
backends share one per-layer cache: logical ``[num_blocks, kv_heads,
block_size, 2 * head_dim]``, each token's K in ``[..., :head_dim]`` and its V in
``[..., head_dim:]`` (``kv_cache.transpose(1, 2).split(head_size, dim=-1)`` in
``vllm/v1/attention/backends/flash_attn.py``, ``do_kv_cache_update``). The
physical order is one of ``vllm.v1.kv_cache_layout.KVCacheLayout``'s stride
permutations (block-, token- or head-major inside a block; layers outside or
inside blocks): each layer arrives as a strided view of that storage, so the
copies here go through views and take any strides, any block size (16, 32 and
64 on FlashAttention) and either device. (The CPU build of vLLM cannot run the
CUDA kernels that write these pages; the tests lay the pages out from that
definition, for every KVCacheLayout.)

Unlike CPU_ATTN's transposed K, K and V are whole ``head_dim`` rows here: one
``copy_`` per run of consecutive blocks, layer and K/V half; on a GPU each is a
device<->host copy straight between the pages and the slot.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hetserve.kv.paged import check, runs

BACKENDS = ("FLASH_ATTN", "FLASHINFER", "FLEX_ATTENTION", "TRITON_ATTN")


def _copy(kv: torch.Tensor, layers: Sequence[torch.Tensor], block_ids: Sequence[int], to_pages: bool) -> None:
    check(kv, layers, block_ids)
    d, bs = kv.shape[4], layers[0].shape[2]
    for t0, b0, n, last in runs(block_ids, kv.shape[3], bs):
        for i, layer in enumerate(layers):
            pages = layer[b0 : b0 + n, :, :last].transpose(0, 1)  # [H, n, t, 2D]
            part = kv[i, :, :, t0 : t0 + (n - 1) * bs + last]  # [2, H, tokens, D]
            part = part.unsqueeze(2) if n == 1 else part.view(2, kv.shape[2], n, bs, d)
            for half in (0, 1):
                page_view = pages[..., half * d : (half + 1) * d]
                page_view.copy_(part[half]) if to_pages else part[half].copy_(page_view)


def gather(layers: Sequence[torch.Tensor], block_ids: Sequence[int], out: torch.Tensor) -> torch.Tensor:
    """Copy the first ``out.shape[3]`` tokens held in ``block_ids`` into ``out`` ([L, 2, H, T, D])."""
    _copy(out, layers, block_ids, to_pages=False)
    return out


def scatter(kv: torch.Tensor, layers: Sequence[torch.Tensor], block_ids: Sequence[int]) -> None:
    """Write every token of ``kv`` ([L, 2, H, T, D]) into the pages ``block_ids``."""
    _copy(kv, layers, block_ids, to_pages=True)


def warm_up(layers: Sequence[torch.Tensor]) -> None:
    """Nothing to compile: torch copies only."""
