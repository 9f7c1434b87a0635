"""``hetserve bench transfer``: what each KV transfer dtype costs and changes.

One tensor-transport server per transfer dtype (``kv_transfer_dtype``), one
after the other in the same run, the same prompts through each: 16 prompts of
about 300 tokens, 64 greedy tokens each. Per dtype: KV bytes moved per
hand-off and the median hand-off time (the server's own metrics), and the
fraction of greedy tokens identical to the exact transfer's (``auto``), with
the first divergence (prompt and token position). A benchmark, not a test:
lossy dtypes may change tokens, and how many depends on the model.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from hetserve_client import scrape_metrics as _metrics

from hetserve.kv import transfer

GREEDY = {"temperature": 0, "ignore_eos": True}


def run_dtype(name: str, prompts: list[str], max_tokens: int, model: str | None) -> dict:
    from hetserve.bench.server import started
    from hetserve_client import stream_grpc

    label = '{model="llm",transport="tensor"}'
    parameters = {"llm": {"kv_transfer_dtype": name}}
    with started(model, {}, kv_transport="tensor", parameters=parameters) as (_, grpc_url, metrics_url, _):
        sampling = {**GREEDY, "max_tokens": max_tokens}
        list(stream_grpc(grpc_url, prompts[0], sampling))  # warm-up
        before = _metrics(metrics_url)
        outputs, times = [], []
        for prompt in prompts:
            count = _metrics(metrics_url).get("hetserve_kv_handoff_seconds_sum" + label, 0)
            outputs.append([t for d in stream_grpc(grpc_url, prompt, sampling) for t in d.token_ids])
            times.append(_metrics(metrics_url)["hetserve_kv_handoff_seconds_sum" + label] - count)
        after = _metrics(metrics_url)
    moved = after["hetserve_kv_bytes_total" + label] - before.get("hetserve_kv_bytes_total" + label, 0)
    return {"dtype": name, "bytes_per_handoff": moved / len(prompts), "handoff_ms_p50": 1000 * statistics.median(times), "outputs": outputs}


def compare(exact: list[list[int]], other: list[list[int]]) -> tuple[float, tuple[int, int] | None]:
    """Fraction of tokens identical position by position, and the first (prompt, position) that differs."""
    same = total = 0
    first = None
    for i, (a, b) in enumerate(zip(exact, other)):
        for j, (x, y) in enumerate(zip(a, b)):
            total += 1
            same += x == y
            if x != y and first is None:
                first = (i, j)
    return same / total if total else 1.0, first


def main(argv: list[str] | None = None) -> int:
    from hetserve.bench.throughput import make_prompts

    parser = argparse.ArgumentParser(prog="hetserve bench transfer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint (default: the built-in default)")
    parser.add_argument("--dtypes", default=",".join(transfer.TRANSFER_DTYPES))
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    names = [transfer.check(n.strip()) for n in args.dtypes.split(",")]
    if transfer.AUTO not in names:
        names.insert(0, transfer.AUTO)  # the exact reference
    prompts = [p + " " + " ".join(["zen"] * 200) for p in make_prompts(args.prompts, seed=3)]
    rows = [run_dtype(name, prompts, args.max_tokens, args.model) for name in names]
    exact = next(r for r in rows if r["dtype"] == transfer.AUTO)
    print(f"{'dtype':<10} {'bytes/hand-off':>15} {'vs auto':>8} {'hand-off ms':>12} {'identical':>10}  first divergence")
    for row in rows:
        row["identical"], row["first_divergence"] = compare(exact["outputs"], row["outputs"])
        where = "none" if row["first_divergence"] is None else "prompt {}, token {}".format(*row["first_divergence"])
        print(
            f"{row['dtype']:<10} {row['bytes_per_handoff']:>15,.0f} {row['bytes_per_handoff'] / exact['bytes_per_handoff']:>8.3f} "
            f"{row['handoff_ms_p50']:>12.1f} {row['identical']:>10.3f}  {where}"
        )
    if args.json:
        args.json.write_text(json.dumps([{k: v for k, v in r.items() if k != "outputs"} for r in rows], indent=1))
    return 0
