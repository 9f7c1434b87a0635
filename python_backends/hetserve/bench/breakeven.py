"""``hetserve bench breakeven``: from which prompt length the split pays.

Time to first token through ``llm`` for prompts of several lengths, prefilled
two ways on the same checkpoint and engine settings: **local** (llm's own
engine: ``remote_prefill_min_tokens`` above every prompt) and **split** (the
``prefill`` model and a KV hand-off: threshold 1). Each at light load (nothing
else running) and at heavy decode load (``--load`` streams decoding all the
while). One server per route, one after the other, in the same run. The
break-even length is the shortest prompt from which split's median TTFT is at
most local's at that load and every longer one measured (README, "Routing",
for the figures and what the default is based on).
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

from hetserve.bench.server import started

ROUTES = {"local": 10**9, "split": 1}


def prompt_of(tokenizer, tokens: int, salt: int) -> str:
    """A prompt of exactly ``tokens`` tokens (as llm tokenizes it), distinct per ``salt``."""
    words = f"{salt} " + " ".join(["beautiful is better than ugly explicit is better than implicit"] * (tokens // 4 + 4))
    ids = tokenizer(words, add_special_tokens=False)["input_ids"]
    for cut in range(tokens, 0, -1):
        text = tokenizer.decode(ids[:cut])
        if len(tokenizer(text)["input_ids"]) == tokens:
            return text
    raise ValueError(f"no prompt of {tokens} tokens")


def ttft(grpc_url: str, prompt: str) -> float:
    from hetserve_client import stream_grpc

    started_at = time.perf_counter()
    for _ in stream_grpc(grpc_url, prompt, {"max_tokens": 2, "temperature": 0, "ignore_eos": True}):
        return time.perf_counter() - started_at
    raise RuntimeError("no token")


class Background:
    """``n`` streams decoding until stopped (each restarts when it reaches its length)."""

    def __init__(self, grpc_url: str, n: int):
        from hetserve_client import stream_grpc

        self.stop = threading.Event()
        self.first = threading.Semaphore(0)

        def run(i: int) -> None:
            announced = False
            while not self.stop.is_set():
                for _ in stream_grpc(grpc_url, f"{i} Simple is better", {"max_tokens": 512, "temperature": 0, "ignore_eos": True}):
                    if not announced:
                        announced = True
                        self.first.release()
                    if self.stop.is_set():
                        break

        self.threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n)]
        for thread in self.threads:
            thread.start()
        for _ in range(n):
            self.first.acquire(timeout=120)

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(120)


def measure(model, engine_args, route: str, lengths, loads, samples: int, tokenizer) -> dict:
    results: dict = {}
    threshold = ROUTES[route]
    with started(model, engine_args, remote_prefill_min_tokens=threshold) as (_, grpc_url, _, _):
        for n in lengths[:2]:  # warm-up: first-time kernel shapes
            ttft(grpc_url, prompt_of(tokenizer, n, 999))
        for load in loads:
            background = Background(grpc_url, load) if load else None
            try:
                for n in lengths:
                    times = [ttft(grpc_url, prompt_of(tokenizer, n, s + 1000 * load)) for s in range(samples)]
                    results[f"{load}:{n}"] = statistics.median(times) * 1e3
                    print(f"{route:5s} load {load:3d} prompt {n:5d} tokens: TTFT {results[f'{load}:{n}']:.1f} ms", flush=True)
            finally:
                if background:
                    background.close()
    return results


def break_even(lengths: list[int], measured: dict, load: int) -> int | None:
    """The shortest length from which split's TTFT is at most local's at every longer length too."""
    found = None
    for n in reversed(lengths):
        if measured["split"][f"{load}:{n}"] > measured["local"][f"{load}:{n}"]:
            break
        found = n
    return found


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoTokenizer

    from hetserve.checkpoint import resolve_model
    from hetserve.launcher import ServeOptions, engine_settings
    from hetserve import names

    parser = argparse.ArgumentParser(prog="hetserve bench breakeven", description=__doc__)
    parser.add_argument("--model", help="checkpoint (default: the built-in default)")
    parser.add_argument("--lengths", default="8,16,32,64,128,256,512,1024")
    parser.add_argument("--load", type=int, default=32, help="streams decoding during the heavy-load rows")
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",")]
    loads = [0, args.load]
    settings = engine_settings(ServeOptions(model=args.model), names.Model.LLM)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(settings["model"]))
    measured = {route: measure(args.model, {}, route, lengths, loads, args.samples, tokenizer) for route in ROUTES}
    print("\n| prompt tokens | " + " | ".join(f"local / split TTFT ms, {load} streams decoding" for load in loads) + " |")
    print("| ---: | " + " | ".join("---" for _ in loads) + " |")
    for n in lengths:
        cells = [f"{measured['local'][f'{load}:{n}']:.1f} / {measured['split'][f'{load}:{n}']:.1f}" for load in loads]
        print(f"| {n} | " + " | ".join(cells) + " |")
    breakeven = {load: break_even(lengths, measured, load) for load in loads}
    for load, n in breakeven.items():
        print(f"break-even at {load} streams decoding: " + (f"{n} tokens" if n else f"none up to {lengths[-1]} tokens"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"lengths": lengths, "loads": loads, "ttft_ms": measured, "breakeven": breakeven}, f, indent=2)
    return 0
