"""``hetserve bench throughput``: streaming tokens/s through ``llm`` against offline vLLM.

One run measures both on the same prompts and engine settings: offline vLLM
(``LLM.generate``, in a subprocess, timed without its start-up) with the
engine arguments of the repository's ``llm/1/model.json``, then N streams of
greedy generation through ``llm`` over gRPC at a given concurrency (a server is
started unless ``--url`` names one). Each side first runs the whole load once
unmeasured (first-time kernel set-up per shape costs a quarter of a cold
pass), then ``--repeats`` measured passes; the median is reported, with each
server process's CPU share over the measured passes (psutil CPU times of the
server's process tree).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from hetserve.bench import offline
from hetserve.checkpoint import _WORDS

ROOT = Path(__file__).resolve().parents[3]


def make_prompts(count: int, seed: int = 0) -> list[str]:
    """Distinct prompts of 20 to 300 words (both routes of the default threshold)."""
    rng = random.Random(seed)
    return [f"{i}: " + " ".join(rng.choice(_WORDS) for _ in range(rng.randint(20, 300))) for i in range(count)]


def offline_tok_s(engine_args: dict, prompts: list[str], max_tokens: int, repeats: int) -> float:
    result = offline.run(engine_args, max_tokens, repeats, prompts=prompts)
    return statistics.median(result["tokens"] / seconds for seconds in result["seconds"])


def served_tok_s(grpc_url: str, prompts: list[str], max_tokens: int, concurrency: int, repeats: int, model: str = "llm") -> float:
    from hetserve_client import stream_grpc

    sampling = {"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}

    def one(prompt: str) -> int:
        return sum(len(d.token_ids) for d in stream_grpc(grpc_url, prompt, sampling, model=model))

    rates = []
    with ThreadPoolExecutor(concurrency) as pool:
        for _ in range(repeats):
            start = time.perf_counter()
            tokens = sum(pool.map(one, prompts))
            rates.append(tokens / (time.perf_counter() - start))
    return statistics.median(rates)


def _label(process, stubs: dict[int, str]) -> str:
    cmd = process.cmdline()
    head = Path(cmd[0]).name if cmd else process.name()
    if head == "triton_python_backend_stub":
        return f"{stubs[process.pid]} stub"
    parent = process.parent()
    while parent is not None and parent.pid not in stubs:
        parent = parent.parent()
    owner = f"{stubs[parent.pid]} " if parent is not None else ""
    return owner + (head if head.startswith(("VLLM", "tritonserver")) else " ".join(cmd)[:40])


def cpu_shares(root_pid: int, run) -> tuple[object, dict[str, float]]:
    """Run ``run()``; return its result and each process's CPU % of the wall time."""
    import psutil

    family = [psutil.Process(root_pid), *psutil.Process(root_pid).children(recursive=True)]
    stubs = {}
    for p in family:
        cmd = p.cmdline()
        if cmd and Path(cmd[0]).name == "triton_python_backend_stub":
            stubs[p.pid] = next((m for m in ("prefill", "llm", "unified") if f"/{m}/" in cmd[1]), cmd[1])
    before = {p.pid: sum(p.cpu_times()[:2]) for p in family}
    start = time.perf_counter()
    result = run()
    wall = time.perf_counter() - start
    shares: dict[str, float] = {}
    for p in family:
        try:
            label = _label(p, stubs)
            shares[label] = shares.get(label, 0.0) + 100 * (sum(p.cpu_times()[:2]) - before[p.pid]) / wall
        except psutil.NoSuchProcess:
            continue
    return result, {k: round(v, 1) for k, v in sorted(shares.items(), key=lambda kv: -kv[1]) if v >= 0.5}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hetserve bench throughput", description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="measured passes after one warm-up pass")
    parser.add_argument("--url", help="gRPC address of a running server (default: start one)")
    parser.add_argument("--server-pid", type=int, help="with --url: the launcher's pid, for CPU shares")
    parser.add_argument("--skip-offline", action="store_true")
    parser.add_argument("--unified", action="store_true", help="also the unified model (one engine, no split), on a server of its own")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)

    from hetserve import names
    from hetserve.launcher import ServeOptions, engine_settings

    # As the server runs llm's engine: model.json's settings plus the
    # checkpoint's dtype (vLLM's "auto" runs a float32 checkpoint in bf16 on
    # this CPU, which the server does not).
    engine_args = engine_settings(ServeOptions(), names.Model.LLM)
    engine_args["enable_prefix_caching"] = False  # as llm's engine (distinct prompts: no effect)
    prompts = make_prompts(args.prompts)
    result = {"prompts": args.prompts, "concurrency": args.concurrency, "max_tokens": args.max_tokens}
    if not args.skip_offline:
        result["offline_tok_s"] = round(offline_tok_s(engine_args, prompts, args.max_tokens, args.repeats), 1)
        print(f"offline vLLM: {result['offline_tok_s']} tok/s", flush=True)

    def load(url: str, model: str) -> float:
        return served_tok_s(url, prompts, args.max_tokens, args.concurrency, args.repeats, model)

    def measured(url: str, pid: int | None, model: str = "llm") -> tuple[float, dict]:
        served_tok_s(url, prompts, args.max_tokens, args.concurrency, 1, model)  # warm-up pass
        return cpu_shares(pid, lambda: load(url, model)) if pid else (load(url, model), {})

    if args.url:
        tok_s, shares = measured(args.url, args.server_pid)
    else:
        from hetserve.bench.server import started

        with started(None, {}) as (_, grpc_url, _, pid):
            tok_s, shares = measured(grpc_url, pid)
    result["llm_stream_tok_s"] = round(tok_s, 1)
    result["cpu_percent"] = shares
    if "offline_tok_s" in result:
        result["ratio"] = round(tok_s / result["offline_tok_s"], 3)
    if args.unified:
        from hetserve.bench.server import started

        with started(None, {}, models=["unified"]) as (_, grpc_url, _, pid):
            unified, unified_shares = measured(grpc_url, pid, "unified")
        result["unified_stream_tok_s"] = round(unified, 1)
        result["unified_cpu_percent"] = unified_shares
        result["llm_over_unified"] = round(tok_s / unified, 3)
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
