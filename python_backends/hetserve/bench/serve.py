"""``hetserve bench serve``: TTFT, inter-token latency and tokens/s of each serving system, by concurrency.

A mixed load: distinct prompts of 20 to 300 words (short ones that ``llm``
prefills itself, long ones it sends to ``prefill``), each generating
``--max-tokens`` greedy tokens; at concurrency C, C clients each send their
next prompt as soon as their last one ends, so prompts keep arriving while the
others decode. Every system gets the same prompts and the engine settings of
``llm/1/model.json``, on a server of its own, started and stopped in turn:

- ``llm``: the split (``llm`` and ``prefill``), over Triton gRPC streaming;
- ``unified``: one engine in one Triton model (the A/B reference);
- ``vllm-serve``: vLLM's own OpenAI server (``vllm serve``), streaming
  ``/v1/completions``: a plain vLLM, no Triton;
- ``vllm-pd``: vLLM's own disaggregated prefill/decode, two OpenAI servers
  joined by NixlConnector with CPU KV buffers (``bench/peer.py``; its
  environment, with ``nixl``, is built on first use).

Each system first runs the whole load once unmeasured at the highest
concurrency. TTFT is from sending a request to its first token, inter-token
latency the gaps between its later tokens (a response carrying k tokens
counts as k gaps of its delay divided by k). Writes ``results.json`` (one
object per system and concurrency), ``report.md`` and PNG plots into
``--out`` (default ``bench/results/<date>``), the servers' output into its
``logs/``. The client runs on the same machine as the servers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

SYSTEMS = ("llm", "unified", "vllm-serve", "vllm-pd")
METRICS = ("ttft_ms_p50", "ttft_ms_p99", "itl_ms_p50", "itl_ms_p99", "output_tok_per_s")


@dataclass
class Timing:
    """One request: when it was sent, and when each batch of tokens arrived."""

    sent: float
    arrivals: list[tuple[float, int]] = field(default_factory=list)  # (time, tokens in that response)

    @property
    def tokens(self) -> int:
        return sum(n for _, n in self.arrivals)

    def ttft(self) -> float:
        return self.arrivals[0][0] - self.sent

    def gaps(self) -> list[float]:
        out, last = [], self.arrivals[0][0]
        for at, n in self.arrivals[1:]:
            if n:
                out += [(at - last) / n] * n
                last = at
        return out


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), linear between the closest ranks."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize(timings: list[Timing], wall_s: float) -> dict:
    ttfts = [1000 * t.ttft() for t in timings if t.arrivals]
    gaps = [1000 * g for t in timings if t.arrivals for g in t.gaps()]
    return {
        "requests": len(timings),
        "ttft_ms_p50": round(percentile(ttfts, 50), 1),
        "ttft_ms_p99": round(percentile(ttfts, 99), 1),
        "itl_ms_p50": round(percentile(gaps, 50), 2),
        "itl_ms_p99": round(percentile(gaps, 99), 2),
        "output_tok_per_s": round(sum(t.tokens for t in timings) / wall_s, 1),
    }


# ------------------------------------------------------------------ clients


async def triton_request(client, model: str, prompt: str, max_tokens: int) -> Timing:
    import numpy as np

    from hetserve import names
    from hetserve.bench.streams import grpc_inputs

    sampling = {"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    timing = Timing(time.perf_counter())

    async def request():
        yield {"model_name": model, "inputs": grpc_inputs(prompt, sampling)}

    got = 0
    async for result, error in client.stream_infer(request()):
        if error is not None:
            raise RuntimeError(f"{model}: {error}")
        ids = result.as_numpy(names.OUTPUT_IDS)
        n = int(np.asarray(ids).size) if ids is not None else 0
        timing.arrivals.append((time.perf_counter(), n))
        got += n
        if got >= max_tokens:
            break
    return timing


async def openai_request(session, url: str, model: str, prompt: str, max_tokens: int,
                         extra: dict | None = None, timing: Timing | None = None) -> Timing:
    """One streamed completion; ``extra``: more fields of the body; ``timing``: one already started."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "return_token_ids": True, **(extra or {})}
    timing = timing or Timing(time.perf_counter())
    async with session.post(f"http://{url}/v1/completions", json=body) as response:
        if response.status != 200:
            raise RuntimeError(f"{url}: HTTP {response.status}: {await response.text()}")
        async for line in response.content:
            n = sse_tokens(line)
            if n is not None:
                timing.arrivals.append((time.perf_counter(), n))
    return timing


def sse_tokens(line: bytes) -> int | None:
    """Tokens in one server-sent-events line of a streamed completion (None: no chunk)."""
    text = line.decode().strip()
    if not text.startswith("data:") or text == "data: [DONE]":
        return None
    chunk = json.loads(text[len("data:"):])
    choices = chunk.get("choices") or []
    if not choices:
        return None
    # vLLM streams one chunk per engine step: its text is one token's (or
    # several after a stall); token ids come only with return_token_ids.
    ids = choices[0].get("token_ids")
    return len(ids) if ids is not None else 1


async def closed_loop(send, prompts: list[str], concurrency: int, bar=None) -> tuple[list[Timing], float]:
    """``concurrency`` clients, each sending the next prompt when its last one ended."""
    queue = list(reversed(prompts))
    timings: list[Timing] = []

    async def client():
        while queue:
            timing = await send(queue.pop())
            timings.append(timing)
            if bar is not None:
                bar.update(1)

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return timings, time.perf_counter() - start


# ------------------------------------------------------------------ servers


@contextmanager
def vllm_serve(engine_args: dict, log: Path, python: str | Path = sys.executable, extra: list[str] = (), env: dict | None = None):
    """vLLM's OpenAI server on a free loopback port, with ``engine_args`` (and ``extra`` arguments,
    ``env`` added to the environment); yields (its address, its process)."""
    import urllib.request

    from hetserve.bench.server import free_port

    port = free_port()
    command = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1", "--port", str(port),
               "--disable-uvicorn-access-log", "--no-enable-prefix-caching", "--served-model-name", "bench", *extra]
    for key, value in engine_args.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            command.append(flag)
        elif value is not False:
            command += [flag, str(value)]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                   env={**os.environ, **(env or {})})
    try:
        deadline = time.monotonic() + 600
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {process.returncode}; see {log}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"vllm serve did not start in 600 s; see {log}") from None
                time.sleep(1)
        yield f"127.0.0.1:{port}", process
    finally:
        os.killpg(process.pid, 15)  # its own session: the server and its engine processes
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait()


def measure(system: str, args, prompts: list[str], engine_args: dict, out: Path) -> list[dict]:
    """Every concurrency of ``args`` against ``system`` on a server of its own."""
    from tqdm import tqdm

    levels = args.concurrency
    rows = []
    logs = out / "logs"  # the servers' output (not committed)
    logs.mkdir(parents=True, exist_ok=True)

    async def run(send) -> None:  # once the server is up
        with tqdm(total=len(prompts) * (1 + len(levels)), desc=system, unit="req", file=sys.stderr) as bar:
            await closed_loop(send, prompts, max(levels), bar)  # unmeasured pass
            for level in levels:
                timings, wall = await closed_loop(send, prompts, level, bar)
                rows.append({"system": system, "model": args.checkpoint, "concurrency": level, **summarize(timings, wall)})

    if system in ("vllm-serve", "vllm-pd"):
        import aiohttp

        from hetserve.bench import peer

        async def go(*urls: str) -> None:
            limits = aiohttp.TCPConnector(limit=0)
            async with aiohttp.ClientSession(connector=limits, timeout=aiohttp.ClientTimeout(total=None)) as session:
                if len(urls) == 2:
                    await run(lambda p: peer.request(session, *urls, "bench", p, args.max_tokens))
                else:
                    await run(lambda p: openai_request(session, urls[0], "bench", p, args.max_tokens))

        if system == "vllm-pd":
            with peer.started(engine_args, logs, vllm_serve) as (prefill, decode):
                asyncio.run(go(prefill, decode))
        else:
            with vllm_serve(engine_args, logs / "vllm-serve.log") as (url, _):
                asyncio.run(go(url))
    else:
        from tritonclient.grpc.aio import InferenceServerClient

        from hetserve.bench.server import started

        async def go(url: str) -> None:
            client = InferenceServerClient(url)
            try:
                await run(lambda p: triton_request(client, system, p, args.max_tokens))
            finally:
                await client.close()

        served = ["prefill", "llm"] if system == "llm" else [system]
        with started(args.model, {}, models=served, log_file=logs / f"{system}.log") as (_, grpc_url, _, _):
            asyncio.run(go(grpc_url))
    return rows


# ------------------------------------------------------------------ report


def write_report(rows: list[dict], out: Path, title: str) -> None:
    """results.json, report.md and one PNG per metric (one line per system) in ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    systems = list(dict.fromkeys(r["system"] for r in rows))
    lines = [f"# {title}", "", "| system | concurrency | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | output tok/s |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in sorted(rows, key=lambda r: (r["concurrency"], systems.index(r["system"]))):
        lines.append(f"| {r['system']} | {r['concurrency']} | " + " | ".join(f"{r[m]:,}" for m in METRICS) + " |")
    plots = {"ttft_ms_p50": "TTFT p50 (ms)", "itl_ms_p50": "inter-token latency p50 (ms)", "output_tok_per_s": "output tokens/s"}
    lines.append("")
    for metric, label in plots.items():
        fig, ax = plt.subplots(figsize=(5, 3.2))
        for system in systems:
            mine = sorted((r for r in rows if r["system"] == system), key=lambda r: r["concurrency"])
            ax.plot([r["concurrency"] for r in mine], [r[metric] for r in mine], marker="o", label=system)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / f"{metric}.png", dpi=100)
        plt.close(fig)
        lines.append(f"![{label}]({metric}.png)")
    (out / "report.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    from hetserve.bench.perf import repository_model
    from hetserve.bench.throughput import ROOT, make_prompts
    from hetserve import names
    from hetserve.launcher import ServeOptions, engine_settings

    parser = argparse.ArgumentParser(prog="hetserve bench serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated, of {', '.join(SYSTEMS)}")
    parser.add_argument("--concurrency", default="1,8,32", help="comma-separated concurrencies")
    parser.add_argument("--prompts", type=int, default=64, help="requests per concurrency")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--model", default=None, help="checkpoint (default: the repository's); e.g. hetserve:bench-125m")
    parser.add_argument("--out", type=Path, default=None, help="default: bench/results/<date>")
    args = parser.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c]
    systems = [s for s in args.systems.split(",") if s]
    unknown = sorted(set(systems) - set(SYSTEMS))
    if unknown:
        parser.error(f"unknown systems {unknown}; known: {', '.join(SYSTEMS)}")
    args.checkpoint = args.model or repository_model()
    out = args.out or ROOT / "bench" / "results" / time.strftime("%Y-%m-%d")
    out.mkdir(parents=True, exist_ok=True)
    # As the server runs llm's engine, dtype included (vLLM's "auto" would run
    # a float32 checkpoint in bf16 on this CPU; the server names the dtype).
    engine_args = engine_settings(ServeOptions(model=args.model), names.Model.LLM)
    engine_args.pop("served_model_name", None)
    prompts = make_prompts(args.prompts)
    rows = []
    for system in systems:
        rows += measure(system, args, prompts, engine_args, out)
        for row in rows[-len(args.concurrency):]:
            print(json.dumps(row), flush=True)
    write_report(rows, out, f"hetserve bench serve: {args.checkpoint}, {args.max_tokens} tokens, {time.strftime('%Y-%m-%d')}")
    print(f"wrote {out / 'report.md'}")
    print((out / "report.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
