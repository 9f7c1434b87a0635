"""``hetserve bench tiers``: what this device does as a prefill tier and as a decode tier.

Offline vLLM (one engine, timed without start-up, after a warm-up pass), with
the engine settings ``hetserve serve`` would give each model:

* **prefill**: ``--batch`` prompts of ``--prompt-tokens`` tokens, one output
  token each: prompt tokens per second (prefill's engine settings);
* **decode**: ``--concurrency`` streams of short prompts generating
  ``--output-tokens`` tokens each: output tokens per second (llm's settings).

Writes ``tiers-<device>-<model>.json`` into ``--results`` (default
``bench/results/``), the file ``hetserve plan`` reads. Name the device as the
price table does (``--device``; default ``cpu-<N>core``). Run it on each
device kind you price, in that device's environment (CUDA vLLM on a GPU).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import re
import statistics
import sys
from pathlib import Path

from hetserve.bench import offline

ROOT = Path(__file__).resolve().parents[3]
RESULTS = ROOT / "bench" / "results"
SHORT_PROMPT = 16  # decode streams' prompts: their prefill is a small part of the time


def default_device() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name(0)).strip("-").lower()
    except ImportError:
        pass
    return f"cpu-{os.cpu_count()}core"


def token_prompts(count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    low = min(100, vocab // 2)
    return [[rng.randrange(low, vocab) for _ in range(length)] for _ in range(count)]


def measure(engine_args: dict, vocab: int, args: argparse.Namespace) -> dict:
    prefill_args, decode_args = engine_args
    prefill = offline.run(
        prefill_args, 1, args.repeats, prompt_ids=token_prompts(args.batch, args.prompt_tokens, vocab, seed=1)
    )
    decode = offline.run(
        decode_args, args.output_tokens, args.repeats, prompt_ids=token_prompts(args.concurrency, SHORT_PROMPT, vocab, seed=2)
    )
    return {
        "prefill": {
            "prompt_tokens_per_s": statistics.median(prefill["prompt_tokens"] / s for s in prefill["seconds"]),
            "prompt_tokens": args.prompt_tokens,
            "batch": args.batch,
        },
        "decode": {
            "output_tokens_per_s": statistics.median(decode["tokens"] / s for s in decode["seconds"]),
            "output_tokens": args.output_tokens,
            "concurrency": args.concurrency,
            "prompt_tokens": SHORT_PROMPT,
        },
    }


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoConfig

    from hetserve import names
    from hetserve.launcher import ServeOptions, engine_settings

    parser = argparse.ArgumentParser(prog="hetserve bench tiers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint (default: the built-in default)")
    parser.add_argument("--device", default=default_device(), help="the device's name in the price table")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--batch", type=int, default=16, help="prompts per prefill pass")
    parser.add_argument("--output-tokens", type=int, default=128)
    parser.add_argument("--concurrency", type=int, default=64, help="decode streams")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    options = ServeOptions(model=args.model)
    engine_args = [engine_settings(options, m) for m in (names.Model.PREFILL, names.Model.LLM)]
    served = engine_args[1]["served_model_name"]
    vocab = AutoConfig.from_pretrained(engine_args[1]["model"]).vocab_size
    record = {
        "device": args.device,
        "model": served,
        "measured_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "hetserve bench tiers " + " ".join(argv if argv is not None else sys.argv[3:]),
        **measure(engine_args, vocab, args),
    }
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / f"tiers-{args.device}-{re.sub(r'[^A-Za-z0-9.]+', '-', served)}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))
    print(f"written to {path}", file=sys.stderr)
    return 0
