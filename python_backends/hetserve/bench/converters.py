"""Bandwidth of the CPU_ATTN converters against a plain ``copy_`` of the same bytes.

Llama-3-8B-shaped KV (32 layers, 8 KV heads, head_dim 128, bfloat16, block size
128), in both page layouts: ``cpu_attn`` (vLLM's "vec" kernel paths) and
``cpu_attn_amx`` (its "amx" path, which vLLM takes for bfloat16 on CPUs with
AMX tiles). For every layout, token count, thread setting and block-id order, ``copy_``
(contiguous -> preallocated contiguous), ``gather`` and ``scatter`` are timed
in turn, ``--repeats`` rounds, and the medians are reported::

    .venv/bin/python -m hetserve.bench.converters --tokens 512 2048 --threads 1 2 --layouts cpu_attn_amx

``--dtypes int8 fp8_e4m3`` also times the workers' coding for each transfer
dtype: ``gather_encoded`` (encoding a few layers at a time as they are
gathered) against a gather of the whole KV followed by ``encode`` over it (two
passes, as the stub used to do), and ``scatter_decoded`` against ``decode_into``
a whole buffer followed by a scatter.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from hetserve.kv import cpu_attn, cpu_attn_amx, transfer

LAYOUTS = {"cpu_attn": cpu_attn, "cpu_attn_amx": cpu_attn_amx}

LAYERS, HEADS, HEAD_DIM, DTYPE = 32, 8, 128, torch.bfloat16


def _random(*shape: int) -> torch.Tensor:
    # Random bit patterns (NaNs included): the converters must move bytes, not values.
    return torch.randint(-(2**15), 2**15, shape, dtype=torch.int16).view(DTYPE)


def _median_ms(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in fns}
    for name, fn in fns.items():  # warm up (numba loads or compiles its kernel on first use)
        fn()
    for r in range(repeats):
        names = list(fns)
        for name in names[r % len(names) :] + names[: r % len(names)]:  # rotate so no one always runs first
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) * 1e3 for name, ts in times.items()}


def measure(tokens: int, threads: int, order: str, repeats: int, torch_only: bool = False, layout: str = "cpu_attn") -> dict:
    module = LAYOUTS[layout]
    block_size = cpu_attn.BLOCK_SIZE
    needed = -(-tokens // block_size)
    num_blocks = 2 * needed + 1
    layers = [_random(num_blocks, HEADS, block_size, 2 * HEAD_DIM) for _ in range(LAYERS)]
    kv = _random(LAYERS, 2, HEADS, tokens, HEAD_DIM)
    out = torch.empty_like(kv)
    src, dst = kv.clone(), torch.empty_like(kv)
    if order == "consecutive":
        ids = list(range(1, 1 + needed))
    else:
        ids = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(tokens))[:needed].tolist()

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    saved = module._kernel
    if torch_only:
        module._kernel = lambda *_: None
    try:
        module.scatter(kv, layers, ids)
        module.gather(layers, ids, out)
        if not torch.equal(out.view(torch.int16), kv.view(torch.int16)):
            raise AssertionError("gather(scatter(kv)) != kv")
        ms = _median_ms(
            {
                "copy": lambda: dst.copy_(src),
                "gather": lambda: module.gather(layers, ids, out),
                "scatter": lambda: module.scatter(kv, layers, ids),
            },
            repeats,
        )
    finally:
        module._kernel = saved
        torch.set_num_threads(previous)
    nbytes = kv.numel() * kv.element_size()
    row = {"layout": layout, "tokens": tokens, "threads": threads, "order": order, "path": "torch" if torch_only else "auto"}
    row["bytes"] = nbytes
    for name, value in ms.items():
        row[f"{name}_ms"] = value
        row[f"{name}_gbps"] = nbytes / value / 1e6
    row["gather_vs_copy"] = ms["copy"] / ms["gather"]
    row["scatter_vs_copy"] = ms["copy"] / ms["scatter"]
    return row


def measure_coding(tokens: int, name: str, repeats: int) -> dict:
    """Fused (per layer group, in cache) against two-pass coding of one KV in ``name``."""
    block_size = cpu_attn.BLOCK_SIZE
    needed = -(-tokens // block_size)
    layers = [_random(2 * needed + 1, HEADS, block_size, 2 * HEAD_DIM) for _ in range(LAYERS)]
    for layer in layers:  # finite values: the coding computes on them
        layer.copy_(torch.randn(layer.shape, dtype=torch.float32))
    ids = torch.randperm(2 * needed + 1, generator=torch.Generator().manual_seed(tokens))[:needed].tolist()
    shape = (LAYERS, 2, HEADS, tokens, HEAD_DIM)
    whole = torch.empty(shape, dtype=DTYPE)
    payload, scales = transfer.encode(torch.zeros(shape, dtype=DTYPE), name)

    def two_pass_gather() -> None:
        cpu_attn.gather(layers, ids, whole)
        transfer.encode(whole, name)

    def two_pass_scatter() -> None:
        transfer.decode_into(payload, scales, name, whole)
        cpu_attn.scatter(whole, layers, ids)

    ms = _median_ms(
        {
            "gather then encode": two_pass_gather,
            "gather_encoded": lambda: transfer.gather_encoded(cpu_attn, layers, ids, payload, scales, name),
            "decode then scatter": two_pass_scatter,
            "scatter_decoded": lambda: transfer.scatter_decoded(cpu_attn, payload, scales, name, layers, ids),
        },
        repeats,
    )
    return {"tokens": tokens, "dtype": name, "threads": torch.get_num_threads(), **{f"{k}_ms": v for k, v in ms.items()}}


def _print_table(tokens: int, rows: list[dict]) -> None:
    mib = rows[0]["bytes"] / 2**20
    print(f"\n{tokens} tokens, {mib:.0f} MiB ({rows[0]['bytes']} bytes)")
    head = f"{'layout':>12} {'path':>5} {'thr':>3} {'ids':>11} | {'copy ms':>8} {'GB/s':>6} | {'gather':>7} {'GB/s':>6} {'/copy':>5}"
    print(head + f" | {'scatter':>7} {'GB/s':>6} {'/copy':>5}")
    for r in rows:
        print(
            f"{r['layout']:>12} {r['path']:>5} {r['threads']:>3} {r['order']:>11} | {r['copy_ms']:8.2f} {r['copy_gbps']:6.1f} | "
            f"{r['gather_ms']:7.2f} {r['gather_gbps']:6.1f} {r['gather_vs_copy']:5.2f} | "
            f"{r['scatter_ms']:7.2f} {r['scatter_gbps']:6.1f} {r['scatter_vs_copy']:5.2f}"
        )


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--order", nargs="+", choices=["consecutive", "shuffled"], default=["consecutive", "shuffled"])
    parser.add_argument("--layouts", nargs="+", choices=list(LAYOUTS), default=list(LAYOUTS))
    parser.add_argument("--torch-only", action="store_true", help="also time the pure-torch fallback path")
    parser.add_argument("--dtypes", nargs="*", default=[], help="also time the coding into these transfer dtypes")
    parser.add_argument("--json", metavar="PATH", help="write the rows as JSON")
    args = parser.parse_args(argv)
    for name in args.dtypes:
        transfer.check(name)

    rows = []
    for tokens in args.tokens:
        table = []
        for layout in args.layouts:
            for threads in args.threads:
                for torch_only in [False, True] if args.torch_only else [False]:
                    for order in args.order:
                        table.append(measure(tokens, threads, order, args.repeats, torch_only, layout))
        _print_table(tokens, table)
        rows += table
        for name in args.dtypes:
            row = measure_coding(tokens, name, args.repeats)
            print(
                f"{name:>9}: gather then encode {row['gather then encode_ms']:7.2f} ms, gather_encoded "
                f"{row['gather_encoded_ms']:7.2f} ms | decode then scatter {row['decode then scatter_ms']:7.2f} ms, "
                f"scatter_decoded {row['scatter_decoded_ms']:7.2f} ms"
            )
            rows.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
