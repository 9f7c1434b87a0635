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

Encoding runs in prefill's stub after its worker gathered the KV into a slot;
decoding writes straight into ``llm``'s slot, in the model's dtype, one
vectorized pass each (no Python per token). The same-host ``shm`` path does
not compress: there the KV is never copied outside the two workers.
"""

from __future__ import annotations

import torch

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
    if name in CASTS:
        return kv.to(CASTS[name]), None
    dtype, top = SCALED[name]
    wide = kv.to(torch.float32, copy=True)  # (never kv itself: it is divided in place)
    scales = wide.abs().amax(dim=-1).div_(top).clamp_(min=torch.finfo(torch.float32).tiny)
    scaled = wide.div_(scales.unsqueeze(-1))
    if dtype == torch.int8:
        return scaled.round_().clamp_(-127, 127).to(torch.int8).view(torch.uint8), scales
    return scaled.to(dtype).view(torch.uint8), scales


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
