"""Greedy outputs of one offline vLLM engine (no split): the tests' reference.

Run as a script so the engine lives and dies in its own process:
``python tests/reference.py REQUEST.json OUTPUT.json`` where the request is
``{"engine_args": {...}, "prompts": [...], "sampling": {...}}``; the output holds
each prompt's token ids, generated token ids and text.
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    from vllm import LLM, SamplingParams

    request_path, output_path = sys.argv[1:3]
    with open(request_path) as f:
        request = json.load(f)
    engine = LLM(**request["engine_args"])
    outputs = engine.generate(request["prompts"], SamplingParams(**request["sampling"]), use_tqdm=False)
    results = [
            {
                "prompt_token_ids": list(o.prompt_token_ids),
                "token_ids": list(o.outputs[0].token_ids),
                "text": o.outputs[0].text,
            }
            for o in outputs
    ]
    with open(output_path, "w") as f:  # not stdout: vLLM logs there
        json.dump(results, f)


if __name__ == "__main__":  # vLLM's CPU platform spawns processes
    main()
