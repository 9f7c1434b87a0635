"""``hetserve bench perf``: Triton's own perf_analyzer, streaming, against ``llm`` and ``unified``.

perf_analyzer is the binary inside the ``tritonclient==2.51.0`` wheel (newer
wheels need glibc 2.38; the wheel is not installed into the project's
environment, whose tritonclient is 2.73). ``install()`` downloads that wheel
once with pip, takes the binary out, and resolves its two libraries
(``libb64.so.0d``, ``libcudart.so.12``) from ``nvidia_pytriton.libs``, which
the project's environment already has. perf_analyzer needs no GPU: the CUDA
runtime is only loaded.

The requests are the generation load of ``hetserve bench throughput``
(distinct prompts, greedy, ``ignore_eos``), written as perf_analyzer input
data, with the numbers in ``sampling_parameters`` as strings, as genai-perf
sends them. Each request generates ``--max-tokens`` tokens (``ignore_eos``),
one response each, so output tokens/s is requests/s times that.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import zipfile
from pathlib import Path

from hetserve.checkpoint import cache_root

WHEEL = "tritonclient==2.51.0"
WHEEL_MEMBER = "tritonclient-2.51.0.data/data/bin/perf_analyzer"
# soname perf_analyzer asks for -> the file name pattern in nvidia_pytriton.libs
LIBRARIES = {"libb64.so.0d": "libb64-*.so.0d", "libcudart.so.12": "libcudart-*.so.12*"}


def install_dir() -> Path:
    return cache_root().parent / "perf_analyzer-2.51.0"


def link_libraries(libs: Path, target: Path) -> None:
    """Give ``target`` the sonames perf_analyzer needs, linked to ``libs``' mangled copies."""
    target.mkdir(parents=True, exist_ok=True)
    for soname, pattern in LIBRARIES.items():
        found = sorted(libs.glob(pattern))
        if not found:
            raise FileNotFoundError(f"perf_analyzer needs {soname}: no {pattern} in {libs} (is nvidia-pytriton installed?)")
        link = target / soname
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(found[0])


def install() -> tuple[Path, dict[str, str]]:
    """The perf_analyzer binary (fetched on first use) and the environment to run it in."""
    root = install_dir()
    binary = root / "perf_analyzer"
    if not binary.exists():
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                 "--platform", "manylinux1_x86_64", "-d", tmp, WHEEL],
                check=True,
            )
            (wheel,) = Path(tmp).glob("tritonclient-*.whl")
            with zipfile.ZipFile(wheel) as archive, archive.open(WHEEL_MEMBER) as src, open(Path(tmp) / "pa", "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.chmod(Path(tmp) / "pa", 0o755)
            os.replace(Path(tmp) / "pa", binary)
    link_libraries(Path(sysconfig.get_paths()["purelib"]) / "nvidia_pytriton.libs", root / "lib")
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(root / "lib"), env.get("LD_LIBRARY_PATH", "")) if p)
    return binary, env


def input_data(prompts: list[str], max_tokens: int) -> dict:
    """perf_analyzer ``--input-data``: one streaming greedy request per prompt, numbers as strings."""
    sampling = json.dumps({"max_tokens": str(max_tokens), "temperature": "0", "ignore_eos": "true"})
    return {"data": [{"text_input": [p], "stream": [True], "sampling_parameters": [sampling]} for p in prompts]}


# perf_analyzer's CSV columns -> result keys (latencies in microseconds)
COLUMNS = {
    "Concurrency": ("concurrency", int),
    "Inferences/Second": ("requests_per_s", float),
    "Response Throughput": ("responses_per_s", float),
    "p50 latency": ("latency_us_p50", int),
    "p99 latency": ("latency_us_p99", int),
}


def parse_csv(text: str) -> list[dict]:
    """Rows of perf_analyzer's ``-f`` CSV, by concurrency, with the columns above."""
    rows = []
    for row in csv.DictReader(io.StringIO(text)):
        missing = [name for name in COLUMNS if name not in row]
        if missing:
            raise ValueError(f"perf_analyzer's CSV lacks {missing} (columns: {list(row)})")
        rows.append({key: kind(float(row[name])) for name, (key, kind) in COLUMNS.items()})
    return sorted(rows, key=lambda r: r["concurrency"])


def run(binary: Path, env: dict, url: str, model: str, data: Path, concurrency: int, requests: int,
        timeout_s: float) -> dict:
    """perf_analyzer --streaming over gRPC at one concurrency; its CSV row."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "pa.csv"
        command = [
            str(binary), "-m", model, "-u", url, "-i", "grpc", "--streaming", "--input-data", str(data),
            "--concurrency-range", str(concurrency),
            "--measurement-mode", "count_windows", "--measurement-request-count", str(requests),
            # Every window is kept: this machine is too noisy for perf_analyzer's
            # default 10% stability, and a window is already many requests.
            "--stability-percentage", "1000", "-f", str(out),
        ]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout_s)
        if done.returncode != 0 or not out.exists():
            raise RuntimeError(f"perf_analyzer failed ({done.returncode}):\n{done.stdout[-3000:]}{done.stderr[-2000:]}")
        (row,) = parse_csv(out.read_text())
    return row


def repository_model() -> str:
    from hetserve.bench.throughput import ROOT

    return json.loads((ROOT / "model_repository" / "llm" / "1" / "model.json").read_text())["model"]


def main(argv: list[str] | None = None) -> int:
    from hetserve.bench.throughput import make_prompts, served_tok_s

    parser = argparse.ArgumentParser(prog="hetserve bench perf", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="llm,unified", help="the models to measure, comma-separated")
    parser.add_argument("--concurrency", default="1,8,64", help="comma-separated concurrencies")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--requests", type=int, default=0, help="requests per measurement window (default: 2 x concurrency, at least 16)")
    parser.add_argument("--model", default=None, help="checkpoint (default: the repository's); e.g. hetserve:bench-125m")
    parser.add_argument("--url", help="gRPC address of a running server serving the models (default: start one)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per perf_analyzer run")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    levels = [int(c) for c in args.concurrency.split(",") if c]
    binary, env = install()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "input.json"
        prompts = make_prompts(args.prompts)
        data.write_text(json.dumps(input_data(prompts, args.max_tokens)))

        def measure(url: str) -> list[dict]:
            rows = []
            for model in models:
                # one unmeasured pass first (vLLM sets up kernels per new shape)
                served_tok_s(url, prompts, args.max_tokens, max(levels), 1, model)
                for level in levels:
                    requests = args.requests or max(16, 2 * level)
                    row = {"model": model, **run(binary, env, url, model, data, level, requests, args.timeout)}
                    # Every request generates max_tokens (ignore_eos). perf_analyzer's
                    # response throughput undercounts at high concurrency (its
                    # windows end on completed requests: 0.6x at 64 here), while
                    # requests/s x latency = concurrency holds (Little's law).
                    row["output_tok_per_s"] = round(row["requests_per_s"] * args.max_tokens, 1)
                    print(f"{model} at concurrency {level}: {row['output_tok_per_s']:.0f} output tokens/s, "
                          f"{row['requests_per_s']:.2f} requests/s, latency p50 {row['latency_us_p50'] / 1000:.0f} ms, "
                          f"p99 {row['latency_us_p99'] / 1000:.0f} ms", flush=True)
                    rows.append(row)
            return rows

        if args.url:
            rows = measure(args.url)
        else:
            from hetserve.bench.server import started

            served = sorted({*models, *(["prefill"] if "llm" in models else [])})
            with started(args.model, {}, models=served) as (_, grpc_url, _, _):
                rows = measure(grpc_url)
    result = {
        "date": time.strftime("%Y-%m-%d"), "checkpoint": args.model or repository_model(),
        "max_tokens": args.max_tokens, "prompts": args.prompts, "perf_analyzer": WHEEL, "rows": rows,
    }
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
