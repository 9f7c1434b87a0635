"""Offline vLLM (``LLM.generate``) on given prompts, timed without start-up.

``python -m hetserve.bench.offline REQUEST.json`` (``prompts`` as text or
``prompt_ids`` as token ids) writes ``result.json`` beside it: generated and
prompt tokens per pass, the seconds of each measured pass (after
one unmeasured warm-up pass) and each prompt's generated token ids (greedy). Its own process: vLLM's CPU platform spawns.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(
    engine_args: dict, max_tokens: int, repeats: int, prompts: list[str] | None = None,
    prompt_ids: list[list[int]] | None = None, env: dict[str, str] | None = None,
) -> dict:
    """This module's ``main`` in a subprocess (``env`` over this process's environment): its result.json as a dict."""
    with tempfile.TemporaryDirectory() as tmp:
        request = Path(tmp) / "request.json"
        request.write_text(json.dumps({
            "engine_args": engine_args, "prompts": prompts, "prompt_ids": prompt_ids,
            "max_tokens": max_tokens, "repeats": repeats,
        }))
        done = subprocess.run(
            [sys.executable, "-m", "hetserve.bench.offline", str(request)], capture_output=True, text=True,
            env={**os.environ, **(env or {})},
        )
        if done.returncode != 0:
            raise RuntimeError(f"offline vLLM failed:\n{done.stderr[-3000:]}")
        return json.loads((Path(tmp) / "result.json").read_text())


def main() -> None:
    from vllm import LLM, SamplingParams

    request_path = Path(sys.argv[1])
    request = json.loads(request_path.read_text())
    engine = LLM(**request["engine_args"])
    params = SamplingParams(max_tokens=request["max_tokens"], temperature=0, ignore_eos=True)
    prompts = request.get("prompts") or [{"prompt_token_ids": ids} for ids in request["prompt_ids"]]
    engine.generate(prompts, params, use_tqdm=False)  # warm-up pass
    seconds = []
    for _ in range(request.get("repeats", 1)):
        start = time.perf_counter()
        outputs = engine.generate(prompts, params, use_tqdm=False)
        seconds.append(time.perf_counter() - start)
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs)
    token_ids = [list(o.outputs[0].token_ids) for o in outputs]  # greedy: a reference for served outputs
    (request_path.parent / "result.json").write_text(
        json.dumps({"tokens": tokens, "prompt_tokens": prompt_tokens, "seconds": seconds, "token_ids": token_ids})
    )


if __name__ == "__main__":  # vLLM's CPU platform spawns processes
    main()
