"""``hetserve bench setup``: what the benchmarks need beyond the project's environment.

Builds the benchmark checkpoint (``hetserve:bench-125m``: 125 M parameters,
random weights from a fixed seed, so every machine builds the same one),
fetches perf_analyzer (``hetserve bench perf``) and builds the environment of
``bench serve``'s vLLM P/D peer (``bench/peer.py``: nixl). All are cached under
``$XDG_CACHE_HOME/hetserve``; running it again is a no-op.
"""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(prog="hetserve bench setup", description=__doc__.split("\n\n")[0]).parse_args(argv)
    from hetserve.bench import peer, perf
    from hetserve.checkpoint import BENCH_MODEL, resolve_model

    print(f"{BENCH_MODEL}: {resolve_model(BENCH_MODEL)}", flush=True)
    binary, _ = perf.install()
    print(f"perf_analyzer ({perf.WHEEL}): {binary}")
    print(f"vLLM P/D peer ({', '.join(peer.NIXL)}): {peer.environment()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
