"""The ``hetserve`` command: ``serve`` a model, ``generate`` a completion."""

from __future__ import annotations

import argparse
import json
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
        engine_args=dict(args.engine_arg),
    )
    if args.model_repository:
        options.model_repository = Path(args.model_repository)
    return serve(options)


def _generate(args: argparse.Namespace) -> int:
    from hetserve_client import stream_grpc, wait_ready

    if args.wait:
        wait_ready(args.http_url, args.wait)
    sampling = {"max_tokens": args.max_tokens, "temperature": args.temperature}
    for delta in stream_grpc(args.url, args.prompt, sampling, model=args.model):
        sys.stdout.write(delta.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _bench(args: argparse.Namespace) -> int:
    import importlib

    return importlib.import_module(f"hetserve.bench.{args.which}").main(args.rest)


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
    serve.add_argument("--model", help="checkpoint path or Hugging Face id (default: built-in tiny Llama, random weights)")
    serve.add_argument("--model-repository", help="Triton model repository (default: the project's)")
    serve.add_argument("--host", default="127.0.0.1")
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
        "--engine-arg", action="append", default=[], type=_engine_arg, metavar="KEY=VALUE",
        help="a vLLM engine argument for both engines (VALUE is JSON, else a string); repeatable",
    )
    serve.set_defaults(func=_serve)

    bench = sub.add_parser("bench", help="run a benchmark: kv (the KV hand-off), throughput, converters", add_help=False)
    bench.add_argument("which", choices=["kv", "throughput", "converters"])
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    bench.set_defaults(func=_bench)

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
    args = parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
