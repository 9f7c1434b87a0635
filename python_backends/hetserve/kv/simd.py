"""Numba intrinsics for moving KV bytes: tile transposes, zips and streaming copies.

Written as LLVM IR (``shufflevector``, ``!nontemporal`` stores, ``llvm.memcpy``)
so that LLVM, not numba's loop vectorizer, picks the instructions: on x86 an 8x8
transpose is 24 unpack shuffles, a streaming copy uses ``vmovntps``. LLVM lowers
the same IR on every target numba supports, only the instructions differ.
Addresses are plain int64s; callers keep the tensors they point into alive.

Why streaming stores: a plain store first reads the destination line into the
cache (read-for-ownership), so a copy moves 3 bytes over the memory bus per byte
copied; a non-temporal store moves 2. That saving pays for most of the in-cache
work of a transpose.

numba caches a compiled kernel keyed on the file that defines it
(``cpu_attn.py``, ``cpu_attn_amx.py``), not on this one: after changing this file, delete
``hetserve/kv/__pycache__/*.nbi`` so the kernels are compiled again.
"""

from __future__ import annotations

import numba
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

_I32, _I64 = ir.IntType(32), ir.IntType(64)
_ADDR = types.void(types.int64, types.int64, types.int64, types.int64)


def _unpack(lo: bool, group: int) -> list[int]:
    """x86's unpack lo/hi of two 8-lane vectors, ``group`` lanes at a time (indices into a ++ b)."""
    first = 0 if lo else 4
    return [x for k in range(0, 4, group) for x in [*range(first + k, first + k + group), *range(8 + first + k, 8 + first + k + group)]]


def _transpose(width: int, m: int):
    """An intrinsic transposing a tile of 8m rows x 8 columns of ``width``-byte elements.

    ``(src, src_stride, dst, dst_stride)``: addresses and row strides in bytes;
    reads rows of 8 elements at ``src``, writes 8 rows of 8m elements (the
    tile's columns) at ``dst``. Unaligned rows are fine. Rows i, i + 8, ... share
    a vector, one 8x8 transpose per 8-lane group of it, so each written row is
    one wide store (m = 4: 64 bytes of bfloat16).
    """
    element = ir.IntType(8 * width)
    row, wide = ir.VectorType(element, 8), ir.VectorType(element, 8 * m)

    @intrinsic
    def transpose(typingctx, src, src_stride, dst, dst_stride):
        def codegen(context, builder, signature, args):
            s, ss, d, ds = args

            def at(base, stride, i, vector):
                return builder.inttoptr(builder.add(base, builder.mul(stride, ir.Constant(_I64, i))), vector.as_pointer())

            def shuffle(a, b, mask):
                return builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(_I32, len(mask)), mask))

            def unpack(a, b, lo, group):  # in every 8-lane group at once
                return shuffle(a, b, [x + 8 * g + (8 * m - 8) * (x >= 8) for g in range(m) for x in _unpack(lo, group)])

            r = []
            for i in range(8):
                parts = [builder.load(at(s, ss, 8 * g + i, row), align=1) for g in range(m)]
                while len(parts) > 1:  # concatenate: [row i | row i + 8 | ...]
                    n = parts[0].type.count
                    parts = [shuffle(parts[k], parts[k + 1], list(range(2 * n))) for k in range(0, len(parts), 2)]
                r.append(parts[0])
            # Three rounds of interleaving (elements, pairs, quads) turn rows into columns.
            a = [unpack(r[i - i % 2], r[i - i % 2 + 1], i % 2 == 0, 1) for i in range(8)]
            b = [unpack(a[4 * (i // 4) + (i % 4) // 2], a[4 * (i // 4) + (i % 4) // 2 + 2], i % 2 == 0, 2) for i in range(8)]
            c = [unpack(b[i // 2], b[i // 2 + 4], i % 2 == 0, 4) for i in range(8)]
            for i in range(8):
                builder.store(c[i], at(d, ds, i, wide), align=1)
            return context.get_dummy_value()

        return _ADDR, codegen

    return transpose


_T16_1, _T16_2, _T16_4, _T32_1 = _transpose(2, 1), _transpose(2, 2), _transpose(2, 4), _transpose(4, 1)
transpose_16x8_i32 = _transpose(4, 2)  # 16 rows of 8 four-byte elements -> 8 rows of 16 (64 bytes each)
transpose_8x8_i32 = _T32_1


_V16 = ir.VectorType(ir.IntType(16), 16)
_V32 = ir.VectorType(ir.IntType(16), 32)


def _mask(values: list[int]) -> ir.Constant:
    return ir.Constant(ir.VectorType(_I32, len(values)), values)


@intrinsic
def zip16(typingctx, dst, src0, src1):
    """Interleave 16 two-byte values at ``src0`` with 16 at ``src1`` into 32 at ``dst`` (s0[0], s1[0], s0[1], ...)."""

    def codegen(context, builder, signature, args):
        d, s0, s1 = args
        a, b = (builder.load(builder.inttoptr(s, _V16.as_pointer()), align=1) for s in (s0, s1))
        zipped = builder.shuffle_vector(a, b, _mask([x for i in range(16) for x in (i, 16 + i)]))
        builder.store(zipped, builder.inttoptr(d, _V32.as_pointer()), align=1)
        return context.get_dummy_value()

    return types.void(types.int64, types.int64, types.int64), codegen


@intrinsic
def unzip16(typingctx, dst0, dst1, src):
    """The inverse of ``zip16``: the even two-byte values of the 32 at ``src`` to ``dst0``, the odd ones to ``dst1``."""

    def codegen(context, builder, signature, args):
        d0, d1, s = args
        both = builder.load(builder.inttoptr(s, _V32.as_pointer()), align=1)
        for d, first in ((d0, 0), (d1, 1)):
            half = builder.shuffle_vector(both, both, _mask(list(range(first, 32, 2))))
            builder.store(half, builder.inttoptr(d, _V16.as_pointer()), align=1)
        return context.get_dummy_value()

    return types.void(types.int64, types.int64, types.int64), codegen


@intrinsic
def copy(typingctx, dst, src, nbytes):
    """``memcpy(dst, src, nbytes)`` (LLVM's: inlined for small constant sizes)."""

    def codegen(context, builder, signature, args):
        d, s, n = args
        byte = ir.IntType(8).as_pointer()
        cgutils.raw_memcpy(builder, builder.inttoptr(d, byte), builder.inttoptr(s, byte), n, 1)
        return context.get_dummy_value()

    return types.void(types.int64, types.int64, types.int64), codegen


@intrinsic
def _stream64(typingctx, dst, src, nbytes):
    """Copy ``nbytes // 64`` 64-byte lines with non-temporal stores; ``dst`` 64-byte aligned."""

    def codegen(context, builder, signature, args):
        d, s, n = args
        line = ir.VectorType(_I64, 8).as_pointer()
        nontemporal = builder.module.add_metadata([ir.Constant(_I32, 1)])
        with cgutils.for_range(builder, builder.udiv(n, ir.Constant(_I64, 64))) as loop:
            at = builder.mul(loop.index, ir.Constant(_I64, 64))
            value = builder.load(builder.inttoptr(builder.add(s, at), line), align=1)
            builder.store(value, builder.inttoptr(builder.add(d, at), line), align=64).set_metadata("nontemporal", nontemporal)
        return context.get_dummy_value()

    return types.void(types.int64, types.int64, types.int64), codegen


@intrinsic
def fence(typingctx):
    """Order every store before it (streaming ones included) before any after it."""

    def codegen(context, builder, signature, args):
        builder.fence("seq_cst")
        return context.get_dummy_value()

    return types.void(), codegen


@numba.njit(inline="always")
def stream(dst, src, nbytes):
    """Copy ``nbytes`` without reading ``dst``'s lines first where ``dst`` is 64-byte aligned.

    Call ``fence()`` before another thread or process may read ``dst``.
    """
    body = nbytes - nbytes % 64 if dst % 64 == 0 else 0
    _stream64(dst, src, body)
    copy(dst + body, src + body, nbytes - body)


@numba.njit(inline="always")
def tile_rows(width, limit):
    """Rows per tile for ``transpose``: 8m, m the widest of 4, 2, 1 with 8m dividing ``limit``.

    Wider tiles pay for 2-byte elements only (4-byte ones already fill a 32-byte row).
    """
    if width == 2 and limit % 32 == 0:
        return 32
    if width == 2 and limit % 16 == 0:
        return 16
    return 8


@numba.njit(inline="always")
def transpose(width, rows, src, src_stride, dst, dst_stride):
    """Transpose a ``rows`` x 8 tile of ``width``-byte elements (``rows`` from ``tile_rows``)."""
    if width == 4:
        _T32_1(src, src_stride, dst, dst_stride)
    elif rows == 32:
        _T16_4(src, src_stride, dst, dst_stride)
    elif rows == 16:
        _T16_2(src, src_stride, dst, dst_stride)
    else:
        _T16_1(src, src_stride, dst, dst_stride)

