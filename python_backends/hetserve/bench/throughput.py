"""``hetserve bench throughput``: tokens/s through ``llm`` against offline vLLM.

One run measures, at each concurrency of ``--concurrency`` (default 1, 8, 64
and 256), offline vLLM (``LLM.generate``, in a subprocess, timed without its
start-up) with the engine arguments of the repository's ``llm/1/model.json``
on the same prompts, then greedy generation through ``llm``: streamed (a
gRPC stream per request, all on one asyncio channel; ``--client threads``: a
thread and a channel per stream, as before 2026-12-01) and not streamed (the
HTTP generate endpoint, one response per request), with that many requests in
flight (closed loop). A
concurrency of c sends max(c, min(64, 4c)) prompts per pass, so that every
stream runs several requests at the low levels. Offline vLLM takes the same
prompts all at once and runs at most c of them at a time (``max_num_seqs``
lowered to c, the same concurrency as the served load),
twice: with vLLM's defaults and as the server runs its engines (threads and
``engine_env``, see ``offline_variants``); the faster is the engine's own
rate, the ceiling for a served path. A server is started
unless ``--url`` names one. Each side first runs the whole load once
unmeasured (first-time kernel set-up per shape costs a quarter of a cold
pass), then ``--repeats`` measured passes; the median is reported, with each
server process's CPU share over the measured passes (psutil CPU times of the
server's process tree).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from hetserve import names
from hetserve.bench import offline
from hetserve.checkpoint import _WORDS

ROOT = Path(__file__).resolve().parents[3]


def make_prompts(count: int, seed: int = 0) -> list[str]:
    """Distinct prompts of 20 to 300 words (both routes of the default threshold)."""
    rng = random.Random(seed)
    return [f"{i}: " + " ".join(rng.choice(_WORDS) for _ in range(rng.randint(20, 300))) for i in range(count)]


def offline_tok_s(engine_args: dict, prompts: list[str], max_tokens: int, repeats: int, env: dict | None = None) -> float:
    result = offline.run(engine_args, max_tokens, repeats, prompts=prompts, env=env)
    return statistics.median(result["tokens"] / seconds for seconds in result["seconds"])


def at_concurrency(engine_args: dict, concurrency: int) -> dict:
    """Engine arguments that run at most ``concurrency`` sequences at a time, as the served load does."""
    return {**engine_args, "max_num_seqs": min(engine_args.get("max_num_seqs", concurrency), concurrency)}


def offline_variants(served_env: dict[str, str]) -> dict[str, dict[str, str]]:
    """The two ways offline vLLM runs here; the faster is the baseline.

    vLLM's defaults: its worker's OpenMP team leaves one core to the
    EngineCore. As served: the served engines configure a KV connector, for
    which vLLM reserves a second core (none at all on a 2-core host, where
    two would leave the team none), and run with llm's ``engine_env``;
    offline gets the same reservation.
    """
    from hetserve.engine import SERVED_CPU_RESERVATION

    return {"default": {}, "as_served": {**served_env, **SERVED_CPU_RESERVATION}}


def prompt_count(concurrency: int) -> int:
    return max(concurrency, min(64, 4 * concurrency))


async def _streamed_pass(url: str, prompts: list[str], sampling: dict, concurrency: int, model: str) -> int:
    """One closed-loop pass of streams on one asyncio gRPC channel: ``concurrency`` in flight.

    Each request is its own ModelStreamInfer call, as a client per request
    would send it, but one thread and one channel carry them all, so the
    client's own CPU (on the server's cores here) stays small.
    """
    from tritonclient.grpc.aio import InferenceServerClient

    from hetserve.bench.streams import grpc_inputs

    client = InferenceServerClient(url)
    pending = list(reversed(prompts))
    tokens = 0

    async def worker() -> None:
        nonlocal tokens
        while pending:
            prompt = pending.pop()

            async def request():
                yield {"model_name": model, "inputs": grpc_inputs(prompt, sampling)}

            got = 0
            async for result, error in client.stream_infer(request()):
                if error is not None:
                    raise error
                ids = result.as_numpy(names.OUTPUT_IDS)
                got += 0 if ids is None else ids.size
                if got >= sampling["max_tokens"]:  # ignore_eos: exactly max_tokens each
                    break
            tokens += got

    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        await client.close()
    return tokens


def served_tok_s(
    url: str, prompts: list[str], max_tokens: int, concurrency: int, repeats: int, model: str = "llm", stream: bool = True,
    client: str = "aio",
) -> float:
    """Median tokens/s over ``repeats`` passes; ``url`` is gRPC for streams, HTTP otherwise.

    Streams go through one asyncio channel (``client="aio"``) or, as before
    2026-12-01, a thread and a tritonclient channel per stream (``"threads"``).
    """
    from hetserve_client import generate_http, stream_grpc

    sampling = {"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    if stream and client == "aio":
        rates = []
        for _ in range(repeats):
            start = time.perf_counter()
            tokens = asyncio.run(_streamed_pass(url, prompts, sampling, concurrency, model))
            rates.append(tokens / (time.perf_counter() - start))
        return statistics.median(rates)

    def one(prompt: str) -> int:
        if stream:
            return sum(len(d.token_ids) for d in stream_grpc(url, prompt, sampling, model=model))
        return len(generate_http(url, prompt, sampling, model=model).token_ids)

    rates = []
    with ThreadPoolExecutor(concurrency) as pool:
        for _ in range(repeats):
            start = time.perf_counter()
            tokens = sum(pool.map(one, prompts))
            rates.append(tokens / (time.perf_counter() - start))
    return statistics.median(rates)


def _label(process, stubs: dict[int, str]) -> str:
    if process.pid == os.getpid():
        return "bench client"  # sends the load from the same cores
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

    family = [psutil.Process(root_pid), *psutil.Process(root_pid).children(recursive=True), psutil.Process()]
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
    parser.add_argument("--concurrency", default="1,8,64,256", help="comma-separated concurrencies")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="measured passes after one warm-up pass")
    parser.add_argument("--stream-only", dest="modes", action="store_const", const=("stream",), default=("stream", "nonstream"),
                        help="measure streamed generation only")
    parser.add_argument("--client", choices=("aio", "threads"), default="aio",
                        help="streamed load: one asyncio gRPC channel (default) or a thread and channel per stream")
    parser.add_argument("--url", help="HTTP,gRPC addresses of a running server (default: start one)")
    parser.add_argument("--server-pid", type=int, help="with --url: the launcher's pid, for CPU shares")
    parser.add_argument("--skip-offline", action="store_true")
    parser.add_argument("--unified", action="store_true", help="also the unified model (one engine, no split), on a server of its own")
    parser.add_argument(
        "--model-parameter", action="append", default=[], metavar="MODEL:KEY=VALUE",
        help="a config.pbtxt parameter for the servers started here (as hetserve serve's), e.g. llm:engine_env={}",
    )
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)

    from hetserve.cli import _model_parameter, _model_parameters
    from vllm.platforms import current_platform

    from hetserve.engine import eager_cpu_env, engine_env
    from hetserve.launcher import ServeOptions, _parameter, engine_settings

    # As the server runs llm's engine: model.json's settings plus the
    # checkpoint's dtype (vLLM's "auto" runs a float32 checkpoint in bf16 on
    # this CPU, which the server does not).
    engine_args = engine_settings(ServeOptions(), names.Model.LLM)
    engine_args["enable_prefix_caching"] = False  # as llm's engine (distinct prompts: no effect)
    parameters = _model_parameters([_model_parameter(p) for p in args.model_parameter])
    levels = [int(c) for c in args.concurrency.split(",") if c]
    rows = [{"concurrency": c, "prompts": prompt_count(c), "max_tokens": args.max_tokens} for c in levels]
    served_env = eager_cpu_env(engine_args, engine_env(
        parameters.get("llm", {}).get("engine_env") or _parameter(ServeOptions().model_repository, "llm", "engine_env", "{}")
    ), current_platform.is_cpu())  # what llm's stub sets for its engine
    for row in [] if args.skip_offline else rows:
        for variant, env in offline_variants(served_env).items():
            rate = offline_tok_s(at_concurrency(engine_args, row["concurrency"]), make_prompts(row["prompts"]), args.max_tokens, args.repeats, env)
            row[f"offline_{variant}_tok_s"] = round(rate, 1)
            print(f"offline vLLM ({variant}), {row['prompts']} prompts: {rate:.1f} tok/s", flush=True)
        row["offline_tok_s"] = max(row["offline_default_tok_s"], row["offline_as_served_tok_s"])

    def measure(http_url: str, grpc_url: str, pid: int | None, model: str) -> None:
        for row in rows:
            prompts = make_prompts(row["prompts"])
            for mode in args.modes:
                url, stream = (grpc_url, True) if mode == "stream" else (http_url, False)

                def load(passes: int) -> float:
                    return served_tok_s(url, prompts, args.max_tokens, row["concurrency"], passes, model, stream, args.client)

                load(1)  # warm-up pass
                tok_s, shares = cpu_shares(pid, lambda: load(args.repeats)) if pid else (load(args.repeats), {})
                row[f"{model}_{mode}_tok_s"] = round(tok_s, 1)
                row[f"{model}_{mode}_cpu_percent"] = shares
                if "offline_tok_s" in row:
                    row[f"{model}_{mode}_ratio"] = round(tok_s / row["offline_tok_s"], 3)
                print(f"{model} {mode} at concurrency {row['concurrency']}: {tok_s:.1f} tok/s {shares}", flush=True)

    if args.url:
        http_url, grpc_url = args.url.split(",")
        measure(http_url, grpc_url, args.server_pid, "llm")
    else:
        from hetserve.bench.server import started

        with started(None, {}, parameters=parameters) as (http_url, grpc_url, _, pid):
            measure(http_url, grpc_url, pid, "llm")
    if args.unified:
        from hetserve.bench.server import started

        with started(None, {}, models=["unified"], parameters=parameters) as (http_url, grpc_url, _, pid):
            measure(http_url, grpc_url, pid, "unified")
    print(table(rows, args.modes, args.unified))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


def table(rows: list[dict], modes: tuple[str, ...], unified: bool) -> str:
    """The rows as a Markdown table: tok/s, and the ratio to offline vLLM where measured."""
    columns = [(m, mode) for m in (("llm", "unified") if unified else ("llm",)) for mode in modes]
    lines = [
        "| concurrency | prompts | offline vLLM tok/s | " + " | ".join(f"`{m}` {mode} tok/s (÷ offline)" for m, mode in columns) + " |",
        "| ---: | ---: | ---: | " + " | ".join("---:" for _ in columns) + " |",
    ]
    for row in rows:
        cells = []
        for m, mode in columns:
            value = row.get(f"{m}_{mode}_tok_s")
            ratio = row.get(f"{m}_{mode}_ratio")
            cells.append("–" if value is None else f"{value:,.0f}" + (f" ({ratio:.2f})" if ratio is not None else ""))
        offline = row.get("offline_tok_s")
        lines.append(f"| {row['concurrency']} | {row['prompts']} | {'–' if offline is None else f'{offline:,.0f}'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
