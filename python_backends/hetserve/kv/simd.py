"""Numba intrinsics for moving KV bytes: 8x8 tile transposes and streaming copies.

Written as LLVM IR (``shufflevector``, ``!nontemporal`` stores, ``llvm.memcpy``)
so that LLVM, not numba's loop vectorizer, picks the instructions: on x86 a tile
transpose is 24 unpack shuffles, a streaming copy uses ``vmovntps``. LLVM lowers
the same IR on every target numba supports, only the instructions differ.
Addresses are plain int64s; callers keep the tensors they point into alive.

Why streaming stores: a plain store first reads the destination line into the
cache (read-for-ownership), so a copy moves 3 bytes over the memory bus per byte
copied; a non-temporal store moves 2. That leaves room for the in-cache work of
a transpose at the speed of a plain copy.
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


def _transpose8(width: int):
    """An intrinsic transposing one 8x8 tile of ``width``-byte elements.

    ``(src, src_stride, dst, dst_stride)``: addresses and row strides in bytes;
    reads 8 rows of 8 elements at ``src``, writes row i of the result (column i
    of the tile) at ``dst + i * dst_stride``. Unaligned rows are fine.
    """
    vector = ir.VectorType(ir.IntType(8 * width), 8)

    @intrinsic
    def transpose(typingctx, src, src_stride, dst, dst_stride):
        def codegen(context, builder, signature, args):
            s, ss, d, ds = args

            def row(base, stride, i):
                return builder.inttoptr(builder.add(base, builder.mul(stride, ir.Constant(_I64, i))), vector.as_pointer())

            def shuffle(a, b, lo, group):
                return builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(_I32, 8), _unpack(lo, group)))

            r = [builder.load(row(s, ss, i), align=1) for i in range(8)]
            # Three rounds of interleaving (elements, pairs, quads) turn rows into columns.
            a = [shuffle(r[i - i % 2], r[i - i % 2 + 1], i % 2 == 0, 1) for i in range(8)]
            b = [shuffle(a[4 * (i // 4) + (i % 4) // 2], a[4 * (i // 4) + (i % 4) // 2 + 2], i % 2 == 0, 2) for i in range(8)]
            c = [shuffle(b[i // 2], b[i // 2 + 4], i % 2 == 0, 4) for i in range(8)]
            for i in range(8):
                builder.store(c[i], row(d, ds, i), align=1)
            return context.get_dummy_value()

        return _ADDR, codegen

    return transpose


transpose8x8_16 = _transpose8(2)
transpose8x8_32 = _transpose8(4)


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
def transpose8x8(width, src, src_stride, dst, dst_stride):
    """``transpose8x8_16`` or ``_32`` by element size (2 or 4 bytes, a compile-time constant)."""
    if width == 2:
        transpose8x8_16(src, src_stride, dst, dst_stride)
    else:
        transpose8x8_32(src, src_stride, dst, dst_stride)

