#!/usr/bin/env python3
"""The GPU side of hetserve's KV path, on a machine with a CUDA GPU and only PyTorch (no vLLM).

    python scripts/gpu_check.py [--json gpu_check.json] [--tokens 512] [--repeats 20]

Three checks, one table, and the rows as JSON with ``--json``:

1. **Converters on CUDA tensors** (``hetserve.kv.flash``): pages laid out as
   vLLM 0.32's FlashAttention/FlashInfer/FlexAttention/Triton backends lay them
   out, in each of ``KVCacheLayout``'s stride orders (re-derived below: vLLM is
   not needed here) at block sizes 16, 32 and 64; gather and scatter on the GPU
   must equal the same on the CPU byte for byte. Gather is timed on device.
2. **Device -> host into a registered shared-memory slot**: a Llama-3-8B-shaped
   KV (32 layers, 8 KV heads, head dim 128, bfloat16; 64 MiB at 512 tokens)
   from CUDA pages into a ``/dev/shm`` file mapped with ``torch.from_file`` and
   registered with ``cudaHostRegister`` -- a slot of ``hetserve.kv.slots``, as prefill's worker writes.
   Per layer through the connector's own ``DeviceSaver`` (``hetserve.kv.device_save``).
   Whole (one device gather, one copy to host), and per layer on a side stream
   while matmuls (standing in for the next layers' compute) run on the default
   stream. Target: the whole 512-token KV in host memory in under 10 ms.
3. **Quantization on the GPU** (``hetserve.kv.transfer``): encode and decode
   throughput per transfer dtype, and the worst error against the exact KV.

``--device cpu`` runs the same code on the CPU with small sizes (no CUDA
registration, no streams): the CPU twin the unit tests run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python_backends"))

from hetserve.kv import flash, transfer  # noqa: E402  (torch only)
from hetserve.kv.device_save import DeviceSaver  # noqa: E402
from hetserve.kv.slots import SlotPool  # noqa: E402

LAYERS, HEADS, HEAD_DIM, DTYPE = 32, 8, 128, torch.bfloat16
# vllm/v1/kv_cache_layout.py (0.32): KVCacheLayout's stride orders of [L, B, H, N, C]
# (layers, blocks, KV heads, tokens in a block, 2 * head_dim).
STRIDE_ORDERS = {
    "LBHNC": (0, 1, 2, 3, 4),
    "LBNHC": (0, 1, 3, 2, 4),
    "LHBNC": (0, 2, 1, 3, 4),
    "BLHNC": (1, 0, 2, 3, 4),
    "BLNHC": (1, 0, 3, 2, 4),
    "BHLNC": (1, 2, 0, 3, 4),
}


def pages(order: tuple[int, ...], layers: int, blocks: int, heads: int, block_size: int, head_dim: int, device: str):
    """Each layer's logical [B, H, N, 2D] view of one storage in ``order``'s physical order, random bits."""
    logical = (layers, blocks, heads, block_size, 2 * head_dim)
    storage = torch.randint(-(2**15), 2**15, [logical[i] for i in order], dtype=torch.int16, device=device).view(DTYPE)
    view = storage.permute([order.index(i) for i in range(5)])
    return [view[i] for i in range(layers)]


def timed(fn, repeats: int, device: str) -> float:
    """Median milliseconds of ``fn`` (CUDA events on a GPU)."""
    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def check_converters(device: str, tokens: int, repeats: int) -> list[dict]:
    rows = []
    layers, heads, head_dim = (LAYERS, HEADS, HEAD_DIM) if device == "cuda" else (2, 2, 16)
    for name, order in STRIDE_ORDERS.items():
        for block_size in (16, 32, 64):
            needed = -(-tokens // block_size)
            ids = torch.randperm(2 * needed + 1, generator=torch.Generator().manual_seed(block_size))[:needed].tolist()
            on_device = pages(order, layers, 2 * needed + 1, heads, block_size, head_dim, device)
            on_cpu = [layer.cpu() for layer in on_device]
            kv_shape = (layers, 2, heads, tokens, head_dim)
            got = flash.gather(on_device, ids, torch.empty(kv_shape, dtype=DTYPE, device=device))
            want = flash.gather(on_cpu, ids, torch.empty(kv_shape, dtype=DTYPE))
            gather_ok = torch.equal(got.cpu().view(torch.int16), want.view(torch.int16))
            fresh = torch.randint(-(2**15), 2**15, kv_shape, dtype=torch.int16).view(DTYPE)
            flash.scatter(fresh.to(device), on_device, ids)
            flash.scatter(fresh, on_cpu, ids)
            scatter_ok = all(torch.equal(a.cpu().view(torch.int16), b.view(torch.int16)) for a, b in zip(on_device, on_cpu))
            out = torch.empty(kv_shape, dtype=DTYPE, device=device)
            ms = timed(lambda: flash.gather(on_device, ids, out), repeats, device)
            nbytes = out.numel() * out.element_size()
            rows.append({
                "check": "converter", "layout": name, "block_size": block_size, "tokens": tokens,
                "gather_equal": gather_ok, "scatter_equal": scatter_ok, "gather_ms": round(ms, 4),
                "gather_gbps": round(nbytes / ms / 1e6, 2), "bytes": nbytes,
            })
    return rows


@contextmanager
def registered_slot(nbytes: int, device: str):
    """A KV slot from the project's own pool (a /dev/shm file mapped with ``torch.from_file``),
    registered with CUDA (page-locked) on a GPU; yields (slot, registered). Unregistered and unlinked after."""
    pool = SlotPool("gpu-check")
    slot = pool.acquire(nbytes)
    registered = False
    try:
        slot.data.fill_(0)  # fault every page in now
        if device == "cuda":
            err = torch.cuda.cudart().cudaHostRegister(slot.data.data_ptr(), slot.capacity, 0)
            if int(err) != 0:
                raise RuntimeError(f"cudaHostRegister failed: {err}")
            registered = True
        yield slot, registered
    finally:
        if registered:
            torch.cuda.cudart().cudaHostUnregister(slot.data.data_ptr())
        pool.close()


def check_device_to_host(device: str, tokens: int, repeats: int) -> list[dict]:
    layers, heads, head_dim = (LAYERS, HEADS, HEAD_DIM) if device == "cuda" else (4, 2, 16)
    block_size = 16
    needed = -(-tokens // block_size)
    ids = list(range(1, needed + 1))
    cache = pages(STRIDE_ORDERS["LBNHC"], layers, needed + 2, heads, block_size, head_dim, device)
    kv_shape = (layers, 2, heads, tokens, head_dim)
    nbytes = layers * 2 * heads * tokens * head_dim * 2
    rows = []
    with registered_slot(nbytes, device) as (slot, registered):
        host = slot.kv(DTYPE, kv_shape)
        staging = torch.empty(kv_shape, dtype=DTYPE, device=device)

        def whole():
            flash.gather(cache, ids, staging)  # pages -> one dense tensor, on the device
            host.copy_(staging, non_blocking=True)

        if device == "cuda":
            copy_ms = timed(lambda: host.copy_(staging, non_blocking=True), repeats, device)
        else:
            copy_ms = timed(lambda: host.copy_(staging), repeats, device)
        whole_ms = timed(whole, repeats, device)
        exact = torch.equal(host.view(torch.int16).cpu(), staging.cpu().view(torch.int16))
        rows.append({"check": "d2h", "mode": "whole", "tokens": tokens, "bytes": nbytes, "ms": round(whole_ms, 3),
                     "copy_only_ms": round(copy_ms, 3), "gbps": round(nbytes / whole_ms / 1e6, 2), "equal": exact,
                     "registered": registered, "under_10ms": whole_ms < 10.0})

        # Per layer: layer i's copy overlaps the compute of the layers after it.
        n = 4096 if device == "cuda" else 256
        a = torch.randn(n, n, device=device, dtype=DTYPE)
        # The connector's own saver (kv/device_save.py), as prefill's worker runs it with kv_save "layer".
        saver = DeviceSaver(flash, torch.device(device))
        host.zero_()

        def compute_only():
            for _ in range(layers):
                a @ a

        def per_layer():
            for i in range(layers):
                a @ a  # "layer i"
                saver.save(cache[i : i + 1], ids, host[i : i + 1], None, transfer.AUTO)
            saver.finish()

        compute_ms = timed(compute_only, repeats, device)
        both_ms = timed(per_layer, repeats, device)
        exact = torch.equal(host.view(torch.int16).cpu(), staging.cpu().view(torch.int16))
        hidden = (compute_ms + whole_ms - both_ms) / whole_ms if whole_ms else 0.0
        rows.append({"check": "d2h", "mode": "per_layer_side_stream", "tokens": tokens, "bytes": nbytes,
                     "ms": round(both_ms, 3), "compute_only_ms": round(compute_ms, 3),
                     "copy_hidden_fraction": round(hidden, 3), "equal": exact, "registered": registered})
    return rows


def check_quantization(device: str, tokens: int, repeats: int) -> list[dict]:
    layers, heads, head_dim = (LAYERS, HEADS, HEAD_DIM) if device == "cuda" else (2, 2, 16)
    kv = torch.randn(layers, 2, heads, tokens, head_dim, device=device).to(DTYPE)
    nbytes = kv.numel() * kv.element_size()
    rows = []
    for name in transfer.TRANSFER_DTYPES[1:]:
        payload, scales = transfer.encode(kv, name)
        out = torch.empty_like(kv)
        transfer.decode_into(payload, scales, name, out)
        err = ((out.float() - kv.float()).abs().amax(dim=-1) / kv.float().abs().amax(dim=-1).clamp(min=1e-30)).max().item()
        encode_ms = timed(lambda: transfer.encode(kv, name), repeats, device)
        decode_ms = timed(lambda: transfer.decode_into(payload, scales, name, out), repeats, device)
        wire = payload.numel() * payload.element_size() + (0 if scales is None else scales.numel() * 4)
        rows.append({"check": "quantize", "dtype": name, "tokens": tokens, "bytes": nbytes, "wire_bytes": wire,
                     "encode_ms": round(encode_ms, 4), "decode_ms": round(decode_ms, 4),
                     "encode_gbps": round(nbytes / encode_ms / 1e6, 2), "max_rel_error": err})
    return rows


def print_table(rows: list[dict]) -> None:
    """One table per check, a column per field."""
    for check in dict.fromkeys(r["check"] for r in rows):
        group = [r for r in rows if r["check"] == check]
        keys = [k for k in dict.fromkeys(k for r in group for k in r) if k != "check"]
        cells = [[str(r.get(k, "")) for k in keys] for r in group]
        widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
        print(f"\n{check}")
        print("  ".join(k.rjust(w) for k, w in zip(keys, widths)))
        for c in cells:
            print("  ".join(v.rjust(w) for v, w in zip(c, widths)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device visible: run on a GPU machine, or pass --device cpu for the CPU twin", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    info = {"check": "machine", "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
            "torch": torch.__version__}
    rows = [info]
    rows += check_converters(args.device, args.tokens, args.repeats)
    rows += check_device_to_host(args.device, args.tokens, args.repeats)
    rows += check_quantization(args.device, args.tokens, args.repeats)
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    failed = [r for r in rows if r.get("gather_equal") is False or r.get("scatter_equal") is False or r.get("equal") is False]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
