"""Offline vLLM (``LLM.generate``) on given prompts, timed without start-up.

``python -m hetserve.bench.offline REQUEST.json`` writes ``result.json`` beside
it: generated tokens per pass and the seconds of each measured pass (after
one unmeasured warm-up pass). Its own process: vLLM's CPU platform spawns.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def main() -> None:
    from vllm import LLM, SamplingParams

    request_path = Path(sys.argv[1])
    request = json.loads(request_path.read_text())
    engine = LLM(**request["engine_args"])
    params = SamplingParams(max_tokens=request["max_tokens"], temperature=0, ignore_eos=True)
    engine.generate(request["prompts"], params, use_tqdm=False)  # warm-up pass
    seconds = []
    for _ in range(request.get("repeats", 1)):
        start = time.perf_counter()
        outputs = engine.generate(request["prompts"], params, use_tqdm=False)
        seconds.append(time.perf_counter() - start)
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    (request_path.parent / "result.json").write_text(json.dumps({"tokens": tokens, "seconds": seconds}))


if __name__ == "__main__":  # vLLM's CPU platform spawns processes
    main()
