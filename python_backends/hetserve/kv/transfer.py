"""Compression in transit: the interchange KV in a transfer dtype.

Where the KV crosses Triton or a network (the ``tensor`` transport, a prefill
tier on another server), ``llm``'s ``kv_transfer_dtype`` parameter chooses
what travels:

* ``auto``: the model's dtype, exact (the default);
* ``float16`` / ``bfloat16``: a cast (exact for a model of that dtype);
* ``int8``: symmetric, one float32 scale per (layer, k|v, head, token):
  ``q = round(x / s)``, ``s = max|x| / 127`` over the head dimension.
  Error bound per element: ``|x - q·s| <= s / 2`` (half a step);
* ``fp8_e4m3``: ``x / s`` in float8 e4m3 (3 mantissa bits), ``s = max|x| / 448``
  per (layer, k|v, head, token). Error bound per element: ``|x - x̂| <=
  |x| / 16 + s · 2**-10`` (half an ulp of a normal value; half the subnormal
  step below 2**-6).

Both 8-bit dtypes travel as uint8 (their bytes).

The vLLM workers do the coding, as part of their copies (``gather_encoded``,
``scatter_decoded``): prefill's worker gathers a few layers at a time from its
paged cache into a small scratch buffer and encodes them from there into the
slot; ``llm``'s worker decodes from its slot into the same kind of buffer and
scatters that into its pages. The buffer (one layer per torch thread) stays in
the CPU's caches, so neither side makes an extra pass over the whole KV in
memory, and the stubs only move the encoded bytes between slots and Triton
tensors. A slot holding an encoded KV keeps the payload ``[L, 2, H, T, D]``
first, then the float32 scales ``[L, 2, H, T]`` (``views``). The same-host
``shm`` path does not compress: there the KV is never copied outside the two
workers.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from math import prod
from types import ModuleType

import torch

from hetserve.kv.slots import kv_view

AUTO = "auto"
CASTS = {"float16": torch.float16, "bfloat16": torch.bfloat16}
SCALED = {"int8": (torch.int8, 127.0), "fp8_e4m3": (torch.float8_e4m3fn, 448.0)}
TRANSFER_DTYPES = (AUTO, *CASTS, *SCALED)
# What each travels as through Triton: the 8-bit ones as their bytes (Triton has
# no FP8 type; an INT8 tensor measured 20 ms slower per hand-off than UINT8 here).
WIRE = {"float16": torch.float16, "bfloat16": torch.bfloat16, "int8": torch.uint8, "fp8_e4m3": torch.uint8}


def check(name: str) -> str:
    if name not in TRANSFER_DTYPES:
        raise ValueError(f"unknown KV transfer dtype {name!r}; expected one of {', '.join(TRANSFER_DTYPES)}")
    return name


def encode(kv: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``kv`` [L, 2, H, T, D] as (payload, scales [L, 2, H, T] float32 or None)."""
    check(name)
    if name == AUTO:
        return kv, None
    payload = torch.empty(kv.shape, dtype=WIRE[name])
    scales = torch.empty(kv.shape[:-1], dtype=torch.float32) if name in SCALED else None
    encode_into(kv, name, payload, scales)
    return payload, scales


def encode_into(kv: torch.Tensor, name: str, payload: torch.Tensor, scales: torch.Tensor | None) -> None:
    """Encode ``kv`` into ``payload`` (WIRE[name]) and ``scales``, which may be views of a slot."""
    if name in CASTS:
        payload.copy_(kv)
        return
    dtype, top = SCALED[name]
    wide = _buffer("wide", torch.float32, tuple(kv.shape))  # (never kv itself: it is divided in place)
    wide.copy_(kv)
    # max |x| over each row as max(max x, -min x): no |x| temporary (allocating one cost 3x the coding)
    torch.maximum(wide.amax(dim=-1), wide.amin(dim=-1).neg_(), out=scales)
    scales.div_(top).clamp_(min=torch.finfo(torch.float32).tiny)
    wide.div_(scales.unsqueeze(-1))
    if dtype == torch.int8:
        wide.round_().clamp_(-127, 127)
    payload.view(dtype).copy_(wide)


def decode_into(payload: torch.Tensor, scales: torch.Tensor | None, name: str, out: torch.Tensor) -> None:
    """Write the KV that ``payload`` (and ``scales``) encode into ``out`` (the model's dtype)."""
    check(name)
    if name == AUTO or name in CASTS:
        out.copy_(payload)
        return
    if scales is None:
        raise ValueError(f"KV in {name} needs its scales")
    dtype, _ = SCALED[name]
    out.copy_(payload.view(dtype).float().mul_(scales.unsqueeze(-1)))


def wire_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype the payload travels in."""
    return model_dtype if name == AUTO else WIRE[check(name)]


def direct(name: str, model_dtype: torch.dtype) -> bool:
    """Whether KV in ``name`` is the model's own bytes (no coding: the workers copy it as is)."""
    return name == AUTO or CASTS.get(name) == model_dtype


def _payload_bytes(name: str, model_dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    return prod(shape) * wire_dtype(name, model_dtype).itemsize


def encoded_nbytes(name: str, model_dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    """Bytes a slot needs after its header for a KV of ``shape`` [L, 2, H, T, D] in ``name``."""
    payload = _payload_bytes(name, model_dtype, shape)
    if name not in SCALED:
        return payload
    return -(-payload // 64) * 64 + prod(shape[:-1]) * 4  # scales start on a cache line


def views(flat: torch.Tensor, name: str, model_dtype: torch.dtype, shape: tuple[int, ...]):
    """A mapped slot's (payload, scales or None) for a KV of ``shape`` in ``name``."""
    payload = kv_view(flat, wire_dtype(check(name), model_dtype), shape)
    if name not in SCALED:
        return payload, None
    offset = -(-_payload_bytes(name, model_dtype, shape) // 64) * 64
    return payload, kv_view(flat, torch.float32, shape[:-1], offset)


_scratch = threading.local()
_KEEP_BYTES = 64 << 20  # scratch kept for the next call, per role and thread (a few layers of a long prompt)


def _buffer(role: str, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """This thread's scratch tensor for ``role``, reused while at most _KEEP_BYTES: a fresh
    allocation of this size costs page faults that took longer than the coding itself."""
    nbytes = prod(shape) * dtype.itemsize
    buf = getattr(_scratch, role, None)
    if buf is None or buf.numel() < nbytes:
        buf = torch.empty(nbytes, dtype=torch.uint8)
        if nbytes <= _KEEP_BYTES:
            setattr(_scratch, role, buf)
    return buf[:nbytes].view(dtype).view(shape)


def _groups(num_layers: int) -> list[range]:
    """Layers a few at a time: one per torch thread (the converters split layers over threads)."""
    step = max(1, torch.get_num_threads())
    return [range(i, min(i + step, num_layers)) for i in range(0, num_layers, step)]


def gather_encoded(
    pages: ModuleType, layers: Sequence[torch.Tensor], block_ids: Sequence[int],
    payload: torch.Tensor, scales: torch.Tensor | None, name: str,
) -> None:
    """``pages.gather`` (a converter: cpu_attn, flash) into ``payload`` [L, 2, H, T, D] in ``name``."""
    model_dtype = layers[0].dtype
    if direct(check(name), model_dtype):
        pages.gather(layers, block_ids, payload)
        return
    if name in SCALED and scales is None:
        raise ValueError(f"KV in {name} needs its scales")
    for group in _groups(len(layers)):
        part = _buffer("pages", model_dtype, (len(group), *payload.shape[1:]))
        pages.gather(layers[group.start : group.stop], block_ids, part)
        encode_into(part, name, payload[group.start : group.stop], None if scales is None else scales[group.start : group.stop])


def scatter_decoded(
    pages: ModuleType, payload: torch.Tensor, scales: torch.Tensor | None, name: str,
    layers: Sequence[torch.Tensor], block_ids: Sequence[int],
) -> None:
    """``pages.scatter`` of the KV that ``payload`` (and ``scales``) encode in ``name``."""
    model_dtype = layers[0].dtype
    if direct(check(name), model_dtype):
        pages.scatter(payload, layers, block_ids)
        return
    if len(layers) != payload.shape[0]:  # (scatter checks the rest)
        raise ValueError(f"interchange KV has {payload.shape[0]} layers, the cache has {len(layers)}")
    for group in _groups(len(layers)):
        part = _buffer("pages", model_dtype, (len(group), *payload.shape[1:]))
        decode_into(payload[group.start : group.stop], None if scales is None else scales[group.start : group.stop], name, part)
        pages.scatter(part, layers[group.start : group.stop], block_ids)
