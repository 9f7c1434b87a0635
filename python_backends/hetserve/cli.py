"""The ``hetserve`` command: ``serve`` a model, ``generate`` a completion."""

from __future__ import annotations

import argparse
import json
import re
import logging
import sys
from pathlib import Path


def _serve(args: argparse.Namespace) -> int:
    from hetserve.launcher import ServeOptions, serve

    options = ServeOptions(
        model=args.model,
        host=args.host,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        startup_timeout=args.startup_timeout,
        log_verbose=args.log_verbose,
        kv_transport=args.kv_transport,
        remote_prefill_min_tokens=args.remote_prefill_min_tokens,
        engine_args=_engine_args(args),
        admin_key=args.admin_key,
        parameters=_model_parameters(args.model_parameter),
        models=[m.strip() for m in args.models.split(",") if m.strip()] if args.models else None,
        python_envs={model: Path(path).resolve() for model, path in args.python_env},
    )
    if args.model_repository:
        options.model_repository = Path(args.model_repository)
    return serve(options)


def _generate(args: argparse.Namespace) -> int:
    from hetserve_client import stream_grpc, wait_ready

    from tritonclient.utils import InferenceServerException

    if args.wait:
        wait_ready(args.http_url, args.wait)
    sampling = {"max_tokens": args.max_tokens, "temperature": args.temperature}
    try:
        for delta in stream_grpc(args.url, args.prompt, sampling, model=args.model):
            sys.stdout.write(delta.text)
            sys.stdout.flush()
    except InferenceServerException as exc:
        message = exc.message() or str(exc)
        hint = ""
        if "unavailable" in message.lower() or "connect" in message.lower():
            hint = f" (is the server at {args.url} up and ready? --wait SECONDS waits for it)"
        print(f"\nhetserve generate: {message}{hint}", file=sys.stderr)
        return 1
    sys.stdout.write("\n")
    return 0


def _bench(args: argparse.Namespace) -> int:
    import importlib

    return importlib.import_module(f"hetserve.bench.{args.which}").main(args.rest)


_UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "ki": 1 << 10, "mi": 1 << 20, "gi": 1 << 30, "ti": 1 << 40}


def parse_bytes(text: str) -> int:
    """``4GiB``, ``512MiB``, ``1.5G``, ``1000000`` -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]i?)?[bB]?\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"expected a size such as 4GiB, 512MiB or 1000000, got {text!r}")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "").lower()])


def _engine_args(args: argparse.Namespace) -> dict:
    """Engine arguments from the vllm-serve-style flags, then --engine-arg."""
    flags = {
        "dtype": args.dtype,
        "max_model_len": args.max_model_len,
        "max_num_seqs": args.max_num_seqs,
        "kv_cache_memory_bytes": args.kv_cache_memory,
    }
    return {**{k: v for k, v in flags.items() if v is not None}, **dict(args.engine_arg)}


def _model_parameter(text: str) -> tuple[str, str, str]:
    match = re.fullmatch(r"([A-Za-z0-9_]+):([A-Za-z0-9_]+)=(.*)", text)
    if not match:
        raise argparse.ArgumentTypeError(f"expected MODEL:KEY=VALUE (e.g. llm:request_timeout_s=60), got {text!r}")
    return match.group(1), match.group(2), match.group(3)


def _python_env(text: str) -> tuple[str, str]:
    model, sep, path = text.partition("=")
    if not sep or not model or not path:
        raise argparse.ArgumentTypeError(f"expected MODEL=PATH (e.g. llm=/opt/envs/vllm-cpu), got {text!r}")
    return model, path


def _model_parameters(items: list[tuple[str, str, str]]) -> dict:
    out: dict = {}
    for model, key, value in items:
        out.setdefault(model, {})[key] = value
    return out


def _engine_arg(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.replace("-", "_"), json.loads(value)
    except json.JSONDecodeError:
        return key.replace("-", "_"), value


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="hetserve", description=__doc__)
    sub = top.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve a model on tritonserver: llm (decode tier) calling prefill")
    serve.add_argument("--model", help="checkpoint path or Hugging Face id (default: a built-in tiny Llama trained on the Zen of Python)")
    serve.add_argument("--model-repository", help="Triton model repository (default: the project's)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument(
        "--models", metavar="NAME[,NAME]",
        help="serve only these engine models of the repository, e.g. prefill on a prefill node whose llm "
        "runs elsewhere (llm:prefill_model=grpc://HOST:PORT/prefill); default: all",
    )
    serve.add_argument("--http-port", type=int, default=8000)
    serve.add_argument("--grpc-port", type=int, default=8001)
    serve.add_argument("--metrics-port", type=int, default=8002)
    serve.add_argument("--startup-timeout", type=float, default=900.0)
    serve.add_argument("--log-verbose", type=int, default=0)
    serve.add_argument(
        "--kv-transport", choices=["shm", "tensor"],
        help="how prefill hands KV to llm: a shared-memory slot on this host (default) or a Triton tensor",
    )
    serve.add_argument(
        "--remote-prefill-min-tokens", type=int,
        help="prompts of at least this many tokens are prefilled by the prefill model, shorter ones by llm",
    )
    serve.add_argument(
        "--python-env", action="append", default=[], type=_python_env, metavar="MODEL=PATH",
        help="run MODEL's stub in the Python environment PATH (EXECUTION_ENV_PATH), e.g. prefill=/opt/envs/vllm-cuda "
        "and llm=/opt/envs/vllm-cpu; build one with scripts/setup.sh PATH; repeatable (default: this environment)",
    )
    serve.add_argument(
        "--admin-key",
        help="the key for Triton's shared-memory and model-repository APIs (header hetserve-admin-key; default: generated)",
    )
    serve.add_argument(
        "--model-parameter", action="append", default=[], type=_model_parameter, metavar="MODEL:KEY=VALUE",
        help="set a config.pbtxt parameter of a model, e.g. llm:request_timeout_s=60; repeatable",
    )
    serve.add_argument("--dtype", help="the engines' dtype (default: the checkpoint's, as vLLM's auto)")
    serve.add_argument("--max-model-len", type=int, help="context length (default: the model's)")
    serve.add_argument("--max-num-seqs", type=int, help="sequences per engine step")
    serve.add_argument("--kv-cache-memory", type=parse_bytes, help="KV cache per engine, e.g. 4GiB")
    serve.add_argument(
        "--engine-arg", action="append", default=[], type=_engine_arg, metavar="KEY=VALUE",
        help="a vLLM engine argument for both engines (VALUE is JSON, else a string); repeatable",
    )
    serve.set_defaults(func=_serve)

    bench = sub.add_parser(
        "bench", add_help=False,
        help="run a benchmark: kv (the KV hand-off), throughput, converters, breakeven (split vs local prefill), "
        "tiers (this device as prefill and decode tier, for hetserve plan), transfer (KV transfer dtypes), "
        "streams (1,000 concurrent streams, each checked), perf (perf_analyzer --streaming against llm and unified), "
        "setup (the benchmark checkpoint and perf_analyzer), serve (TTFT, ITL, tok/s of llm, unified and vllm serve by concurrency)",
    )
    bench.add_argument("which", choices=["kv", "throughput", "converters", "breakeven", "tiers", "transfer", "streams", "perf", "setup", "serve"])
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    bench.set_defaults(func=_bench)

    plan = sub.add_parser("plan", help="cost of homogeneous and split configurations from measured tiers and a price table", add_help=False)
    plan.add_argument("rest", nargs=argparse.REMAINDER)  # main() hands these to hetserve.plan as they are

    gen = sub.add_parser("generate", help="stream one completion from a running server (gRPC)")
    gen.add_argument("prompt")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--url", default="127.0.0.1:8001", help="gRPC address")
    gen.add_argument("--model", default="llm")
    gen.add_argument("--wait", type=float, default=0.0, help="seconds to wait for the server to become ready")
    gen.add_argument("--http-url", default="127.0.0.1:8000", help="HTTP address used by --wait")
    gen.set_defaults(func=_generate)
    return top


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s hetserve %(levelname)s: %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["plan"]:  # its options start with "--": argparse's REMAINDER would not take them
        from hetserve import plan

        return plan.main(argv[1:])
    args = parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
