"""``hetserve bench kv``: the real KV hand-off on a running server, against memcpy.

Serves a checkpoint whose KV per token equals Llama-3-8B's (32 layers, 8 KV
heads, head dim 128; everything else tiny, random weights, built locally)
unless ``--url`` names a running server, then sends prompts of exactly 128, 512
and 2,048 tokens one at a time, each prefilled by the ``prefill`` model and
continued by ``llm`` for one token. The hand-off time of each request — from
the producer's gather start to the consumer's scatter end, engine compute
excluded — comes from the server's own ``hetserve_kv_handoff_seconds``
histogram (one request at a time, so each sum's increase is one hand-off).
A plain ``copy_`` of the same bytes, timed in this process in the same run, is
the yardstick: ``ratio`` = hand-off bandwidth / memcpy bandwidth. The hand-off
copies twice, so 0.5 is its ceiling. The table also shows the gather, the
scatter, and the time between them: with ``kv_load early`` (llm's default)
until decode's worker, holding the request already, next looks at the slot;
with ``after``, prefill's engine finishing its step, the BLS reply, llm adding
the decode request and decode's engine scheduling it.

``--kv-save all,layer`` runs the whole series once per way prefill's connector
saves the KV (every layer at the end of the step, or each layer as vLLM
finishes it; a server per way, one after the other in the same run) and adds
the time to first token, streamed over gRPC, to each row. Layer by layer with
``kv_load early``, llm's worker scatters the layers already written while
prefill computes the rest: gather and scatter are each side's copying, the
hand-off ends at the last scatter, and "between" is negative by the part of
the scatter that ran before the gather ended.

``--kv-load early,after`` runs it once per way ``llm`` loads the KV (its
engine waits for the KV while prefill runs and loads it as soon as it is
written, or takes the request after prefill's reply; a server each).

``--transfer-dtypes auto,int8,fp8_e4m3`` (with ``--transport tensor``: the
``shm`` path never compresses) runs the series once per ``kv_transfer_dtype``,
a server each. Such a row's ``dtype`` is the transfer dtype, ``bytes`` what
crossed Triton (payload and scales), and ``gbps``, ``memcpy_gbps`` and
``ratio`` are on the KV's size in the model's dtype: the KV delivered per
second against a plain copy of that KV.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

BENCH_MODEL = "hetserve:kv-llama3-8b-shape"
SERIES = ("bytes_total", "gather_seconds_sum", "handoff_seconds_sum", "scatter_seconds_sum", "handoff_seconds_count")


def scrape(metrics_url: str, transport: str) -> dict[str, float]:
    from hetserve_client import scrape_metrics

    samples = scrape_metrics(metrics_url)
    labels = f'{{model="llm",transport="{transport}"}}'
    return {name: samples.get(f"hetserve_kv_{name}{labels}", 0.0) for name in SERIES}


def prompt_of(tokenizer, num_tokens: int) -> str:
    """A text the model's tokenizer turns into exactly ``num_tokens`` tokens."""
    words = max(num_tokens - 1, 1)
    for _ in range(50):
        text = " ".join(["token"] * words)
        n = len(tokenizer.encode(text))
        if n == num_tokens:
            return text
        words += num_tokens - n
    raise RuntimeError(f"no prompt of exactly {num_tokens} tokens found")


def memcpy_ms(nbytes: int, repeats: int = 30) -> float:
    """The median time of a plain copy of ``nbytes``: the faster of one thread and torch's default.

    (The faster one is the harsher yardstick; on two shared cores either can win.)
    """
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)
    time.sleep(0.5)  # let the server's engines go idle
    default = torch.get_num_threads()
    best = float("inf")
    for threads in sorted({1, default}):
        torch.set_num_threads(threads)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - start)
        best = min(best, statistics.median(times) * 1e3)
    torch.set_num_threads(default)
    return best


def handoff_ms(http_url: str, metrics_url: str, transport: str, prompt: str, grpc_url: str | None = None):
    """One request's (hand-off, gather, scatter) ms, bytes moved and time to first token (ms; with ``grpc_url``)."""
    from hetserve_client import generate_http, stream_grpc

    sampling = {"max_tokens": 2, "temperature": 0, "ignore_eos": True}
    before = scrape(metrics_url, transport)
    ttft = float("nan")
    if grpc_url:
        start = time.perf_counter()
        for i, _ in enumerate(stream_grpc(grpc_url, prompt, sampling)):
            if i == 0:
                ttft = (time.perf_counter() - start) * 1e3
    else:
        generate_http(http_url, prompt, sampling)
    after = scrape(metrics_url, transport)
    delta = {name: after[name] - before[name] for name in SERIES}
    if delta["handoff_seconds_count"] != 1:
        raise RuntimeError("the request was not handed off (prefilled locally?): check remote_prefill_min_tokens")
    ms = {name: delta[f"{name}_seconds_sum"] * 1e3 for name in ("handoff", "gather", "scatter")}
    return ms["handoff"], ms["gather"], ms["scatter"], delta["bytes_total"], ttft


def run(args: argparse.Namespace, http_url: str, metrics_url: str, tokenizer, grpc_url: str | None = None,
        kv_save: str = "all", transfer_dtype: str = "auto", kv_load: str = "early") -> list[dict]:
    from tqdm import tqdm

    rows = []
    plan = [(n, args.runs_long if n >= 2048 else args.runs) for n in args.tokens]
    desc = f"kv hand-off (kv_save {kv_save}, kv_load {kv_load}, {transfer_dtype})"
    with tqdm(total=sum(r for _, r in plan) + len(plan), desc=desc, unit="req") as bar:
        for tokens, runs in plan:
            prompt = prompt_of(tokenizer, tokens)
            handoff_ms(http_url, metrics_url, args.transport, prompt, grpc_url)  # warm: slot files, mappings
            bar.update()
            samples = []
            for _ in range(runs):
                samples.append(handoff_ms(http_url, metrics_url, args.transport, prompt, grpc_url))
                bar.update()
            nbytes = int(samples[0][3])
            # The KV in the model's dtype: what a compressed hand-off delivers.
            kv_bytes = nbytes if transfer_dtype == "auto" else kv_bytes_per_token(args) * tokens
            handoff = sorted(s[0] for s in samples)
            median = statistics.median(handoff)
            copy = memcpy_ms(kv_bytes)
            rows.append({
                "tokens": tokens,
                "kv_save": kv_save,
                "kv_load": kv_load,
                "dtype": args.dtype if transfer_dtype == "auto" else transfer_dtype,
                "bytes": nbytes,
                "ms_median": round(median, 3),
                "ms_p90": round(handoff[min(len(handoff) - 1, int(0.9 * len(handoff)))], 3),
                "gbps": round(kv_bytes / median / 1e6, 3),
                "memcpy_gbps": round(kv_bytes / copy / 1e6, 3),
                "ratio": round(copy / median, 3),
                "ttft_ms_median": round(statistics.median(s[4] for s in samples), 3),
                "_gather_ms": round(statistics.median(s[1] for s in samples), 3),
                "_scatter_ms": round(statistics.median(s[2] for s in samples), 3),
                # Neither copy (see the module doc): the wait from the stamp to the scatter.
                "_between_ms": round(statistics.median(s[0] - s[1] - s[2] for s in samples), 3),
                "_memcpy_ms": round(copy, 3),
            })
    return rows


def print_table(rows: list[dict], transport: str) -> None:
    print(f"\nKV hand-off, transport {transport} (gather start -> scatter end), against memcpy of the same bytes")
    print(f"{'tokens':>6} {'kv_save':>7} {'kv_load':>7} {'dtype':>9} {'MiB':>7} | {'median ms':>9} {'p90 ms':>7} {'GB/s':>6} | "
          f"{'gather':>7} {'scatter':>7} {'between':>7} | {'memcpy ms':>9} {'GB/s':>6} | {'ratio':>5} | {'TTFT ms':>7}")
    for r in rows:
        print(f"{r['tokens']:>6} {r['kv_save']:>7} {r['kv_load']:>7} {r['dtype']:>9} {r['bytes'] / 2**20:7.1f} | {r['ms_median']:9.2f} "
              f"{r['ms_p90']:7.2f} {r['gbps']:6.2f} | {r['_gather_ms']:7.2f} {r['_scatter_ms']:7.2f} {r['_between_ms']:7.2f} | "
              f"{r['_memcpy_ms']:9.2f} {r['memcpy_gbps']:6.2f} | {r['ratio']:5.2f} | {r['ttft_ms_median']:7.1f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hetserve bench kv", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[128, 512, 2048])
    parser.add_argument("--runs", type=int, default=20, help="requests per token count (default 20)")
    parser.add_argument("--runs-long", type=int, default=5, help="requests at >= 2,048 tokens (default 5)")
    parser.add_argument("--dtype", default="bfloat16", help="the engines' dtype (the KV travels in it)")
    parser.add_argument("--transport", choices=["shm", "tensor"], default="shm")
    parser.add_argument("--transfer-dtypes", default="auto",
                        help="kv_transfer_dtype(s), comma-separated, a server each (not auto: --transport tensor)")
    parser.add_argument("--model", default=BENCH_MODEL, help="checkpoint (default: built-in, Llama-3-8B-shaped KV)")
    parser.add_argument("--kv-save", default="all", help="how prefill saves the KV: all, layer, or all,layer (a server each)")
    parser.add_argument("--kv-load", default="early",
                        help="when llm's engine takes the request: early, after, or early,after (a server each)")
    parser.add_argument("--url", help="HTTP address of a running server (default: start one)")
    parser.add_argument("--grpc-url", help="with --url: its gRPC address, for the time to first token")
    parser.add_argument("--metrics-url", help="its metrics address (with --url)")
    parser.add_argument("--json", metavar="PATH", help="write the rows as JSON")
    args = parser.parse_args(argv)
    from hetserve.kv import transfer

    transfer_dtypes = [transfer.check(name.strip()) for name in args.transfer_dtypes.split(",")]
    if args.transport == "shm" and transfer_dtypes != ["auto"]:
        parser.error("--transfer-dtypes other than auto need --transport tensor (the shm path never compresses)")
    if args.url and len(transfer_dtypes) > 1:
        parser.error("with --url, one --transfer-dtypes: the running server's kv_transfer_dtype")

    from transformers import AutoTokenizer

    from hetserve.checkpoint import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(args.model))
    if args.url:
        metrics_url = args.metrics_url or args.url.rsplit(":", 1)[0] + ":8002"
        rows = run(args, args.url, metrics_url, tokenizer, args.grpc_url, args.kv_save, transfer_dtypes[0])
    else:
        rows = [
            row for load in args.kv_load.split(",") for mode in args.kv_save.split(",") for name in transfer_dtypes
            for row in _with_server(args, tokenizer, mode, name, load)
        ]
    print_table(rows, args.transport)
    if args.json:
        Path(args.json).write_text(json.dumps([{k: v for k, v in r.items() if not k.startswith("_")} for r in rows], indent=1))
    return 0


def kv_bytes_per_token(args: argparse.Namespace) -> int:
    """Bytes of one token's KV in the engines' dtype, from the checkpoint's config."""
    from transformers import AutoConfig

    from hetserve.checkpoint import resolve_model
    from hetserve.kv.format import ModelFingerprint

    return ModelFingerprint.from_hf_config(AutoConfig.from_pretrained(resolve_model(args.model)), args.dtype).bytes_per_token


def _with_server(args: argparse.Namespace, tokenizer, kv_save: str, transfer_dtype: str = "auto", kv_load: str = "early") -> list[dict]:
    from hetserve.bench.server import started

    longest = max(args.tokens) + 64
    engine_args = {
        "dtype": args.dtype,
        "max_model_len": longest,
        "max_num_batched_tokens": longest,
        "max_num_seqs": 4,
        # Room for the longest prompt's KV (and a little more) in each engine.
        "kv_cache_memory_bytes": 3 * longest * 32 * 2 * 8 * 128 * 4,
    }
    parameters = {"prefill": {"kv_save": kv_save}, "llm": {"kv_transfer_dtype": transfer_dtype, "kv_load": kv_load}}
    with started(args.model, engine_args, kv_transport=args.transport, parameters=parameters) as (http_url, grpc_url, metrics_url, _):
        return run(args, http_url, metrics_url, tokenizer, grpc_url, kv_save, transfer_dtype, kv_load)


if __name__ == "__main__":
    raise SystemExit(main())
