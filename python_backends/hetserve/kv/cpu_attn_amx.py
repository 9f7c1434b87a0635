"""Converters between the interchange format and CPU_ATTN pages on vLLM's AMX kernel path.

On x86 CPUs with AMX tiles, vLLM's CPU attention keeps bfloat16 KV (block
sizes that are multiples of 32, head sizes that are multiples of 32) packed for
AMX's bf16 dot products, which take pairs of values: the per-layer tensor is
the same ``[num_blocks, kv_heads, block_size, 2 * head_dim]``, each (block,
head) page K then V, but inside a page

* K is ``[block_size / 16, head_dim / 2, 16, 2]``: for each group of 16
  tokens and each pair of dims, the 16 tokens' two values;
* V is ``[head_dim / 16, block_size / 2, 16, 2]``: for each group of 16 dims
  and each pair of tokens, the 16 dims of both tokens, interleaved.

(Found by writing each (token, dim) with vLLM's own ``cpu_attn_reshape_and_cache``
for the "amx" path and reading where it landed; ``cpu_attn.converter_for``
checks it against that writer whenever an engine starts on such a CPU, and
tests/unit/kv/test_cpu_attn_amx.py at every block size.)

A numba kernel (``simd``'s shuffles) moves one (block, head) page at a time
through an L1/L2-resident buffer: K as 16x8 transposes of 4-byte pairs, V as
two token rows zipped 16 values at a time, and the page (scatter) or the token
rows (gather) written to memory with streaming stores, as ``cpu_attn``'s kernel
does for the other layout. Without numba, the copies are strided torch views,
one ``copy_`` per run of consecutive blocks, layer and K/V half; a partial last
block in whole groups (of 16 tokens for K, of 2 for V) plus the rest.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Iterator, Sequence

import torch

from hetserve.kv import cpu_attn
from hetserve.kv.paged import check, runs


@functools.cache
def _kernel(bs: int):
    """The numba kernel for one layer of ``bs``-token blocks of 2-byte values, or None without numba.

    Same arguments as ``cpu_attn``'s kernel (``cpu_attn.run_layers``). The
    layout needs head_dim and ``bs`` in multiples of 16.
    """
    try:
        import numba

        from hetserve.kv import simd
    except ImportError:
        return None

    @numba.njit("void(int64, int64, int64, int64, int64, int64, int64[::1], int64, boolean, int64)", nogil=True, cache=True)
    def kernel(kv, half, head, pages, heads, d, ids, tokens, to_pages, b):
        row = 2 * d  # bytes of one token's K (or V)
        page_half = bs * row  # a page's K (or V)
        group = 32 * d  # K's 16-token group: [d/2 pairs][16 tokens] of 4 bytes
        line = 32 * bs  # V's step from one 16-dim group to the next: [bs/2 token pairs][64 bytes]
        # Scatter builds a page (K, then V) in the staging buffer b and streams it out whole; gather reads
        # the page where it lies (faster than copying it in first) and builds its tokens' rows
        # in b (K [bs, d], then V [bs, d]), streamed out to kv.
        blocks = ids.shape[0]
        for q in range(blocks * heads):
            h, j = (q // blocks, q % blocks) if to_pages else (q % heads, q // heads)
            n = min(bs, tokens - j * bs)
            k = kv + (h * head + j * bs * d) * 2  # this block's K rows [n, d]
            v = k + half * 2
            p = pages + (ids[j] * heads + h) * 2 * page_half
            if to_pages:
                # A partial block is written where it lies: the slots past the prompt keep what they hold.
                a = b if n == bs else p
                full = n - n % 16
                for t in range(0, full, 16):
                    for c in range(0, d // 2, 8):
                        simd.transpose_16x8_i32(k + t * row + 4 * c, row, a + (t // 16) * group + 64 * c, 64)
                for t in range(full, n):
                    for c in range(d // 2):
                        simd.copy(a + (t // 16) * group + 64 * c + 4 * (t % 16), k + t * row + 4 * c, 4)
                for t in range(0, n - 1, 2):
                    for e in range(d // 16):
                        simd.zip16(a + page_half + e * line + 32 * t, v + t * row + 32 * e, v + (t + 1) * row + 32 * e)
                if n % 2:
                    t = n - 1
                    for x in range(d):
                        simd.copy(a + page_half + (x // 16) * line + 32 * t + 4 * (x % 16), v + t * row + 2 * x, 2)
                if n == bs:
                    simd.stream(p, a, 2 * page_half)
            else:
                # Whole tiles, also past the prompt: rows of b past it are not copied out.
                for t in range(0, n, 8):
                    for c in range(0, d // 2, 8):
                        simd.transpose_8x8_i32(p + (t // 16) * group + 64 * c + 4 * (t % 16), 64, b + t * row + 4 * c, row)
                for t in range(0, n, 2):
                    for e in range(d // 16):
                        simd.unzip16(b + page_half + t * row + 32 * e, b + page_half + (t + 1) * row + 32 * e, p + page_half + e * line + 32 * t)
                simd.stream(k, b, n * row)
                simd.stream(v, b + page_half, n * row)
        simd.fence()

    return kernel


def _views(page: torch.Tensor, part: torch.Tensor, half: int, bs: int, tokens: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Pairs of (page view, interchange view) over the same values, for ``tokens`` tokens.

    ``page``: one half of n consecutive pages, [n, H, bs * D]; ``part``: their
    tokens in the interchange layout, [H, tokens, D] (tokens dense).
    """
    n, heads, d = page.shape[0], page.shape[1], part.shape[-1]
    if half == 0:  # K: [g = bs/16][d/2][16 tokens][2 dims], in token order [g][16][d/2][2]
        # A pair of dims is one 4-byte unit on both sides: a transpose of 4-byte elements
        # (3x faster than moving the 2-byte halves apart).
        page, part = page.view(torch.int32), part.view(torch.int32)
        group, pages = 16, page.view(n, heads, bs // 16, d // 2, 16).permute(1, 0, 2, 4, 3)
        shape = (d // 2,)
    else:  # V: [d/16][p = bs/2][16 dims][2 tokens], in token order [p][2][d/16][16]
        group, pages = 2, page.view(n, heads, d // 16, bs // 2, 16, 2).permute(1, 0, 3, 5, 2, 4)
        shape = (d // 16, 16)
    full, rest = divmod(tokens, group)
    if n > 1 or not rest:  # whole groups only: blocks of a run are full, or the prompt ends on a group
        whole = full // n
        yield pages[:, :, :whole], part[:, : n * whole * group].view(heads, n, whole, group, *shape)
        return
    if full:
        yield pages[:, :, :full], part[:, : full * group].view(heads, 1, full, group, *shape)
    yield pages[:, :, full, :rest], part[:, full * group : tokens].view(heads, 1, rest, *shape)


def _copy(kv: torch.Tensor, layers: Sequence[torch.Tensor], block_ids: Sequence[int], to_pages: bool) -> None:
    check(kv, layers, block_ids)
    heads, d, bs = kv.shape[2], kv.shape[4], layers[0].shape[2]
    if d % 16 or bs % 16:
        raise ValueError(f"the AMX page layout needs head_dim and block size in multiples of 16, got {d} and {bs}")
    if kv.element_size() != 2:
        raise ValueError(f"the AMX page layout packs 2-byte values in pairs, got {kv.dtype}")
    if not kv.shape[3]:
        return
    kernel = _kernel(bs) if all(layer.is_contiguous() for layer in layers) else None
    if kernel is not None:
        cpu_attn.run_layers(kernel, kv, layers, block_ids, to_pages)
        return
    for t0, b0, n, last in runs(block_ids, kv.shape[3], bs):
        tokens = (n - 1) * bs + last
        for i, layer in enumerate(layers):
            halves = layer[b0 : b0 + n].view(n, heads, 2, bs * d)
            for half in (0, 1):
                for page_view, kv_view in _views(halves[:, :, half], kv[i, half, :, t0 : t0 + tokens], half, bs, tokens):
                    page_view.copy_(kv_view) if to_pages else kv_view.copy_(page_view)


def gather(layers: Sequence[torch.Tensor], block_ids: Sequence[int], out: torch.Tensor) -> torch.Tensor:
    """Copy the first ``out.shape[3]`` tokens held in ``block_ids`` into ``out`` ([L, 2, H, T, D])."""
    _copy(out, layers, block_ids, to_pages=False)
    return out


def scatter(kv: torch.Tensor, layers: Sequence[torch.Tensor], block_ids: Sequence[int]) -> None:
    """Write every token of ``kv`` ([L, 2, H, T, D]) into the pages ``block_ids``."""
    _copy(kv, layers, block_ids, to_pages=True)


def warm_up(layers: Sequence[torch.Tensor]) -> None:
    """Compile (or load) the kernel now, not in the first request's hand-off."""
    cpu_attn.warm_up(layers, sys.modules[__name__])
