"""Run one offline vLLM engine in its own process; the tests' reference and probe.

``python tests/engine_runner.py REQUEST.json OUTPUT.json`` where the request is
``{"engine_args": {...}, "kv_role": null | "kv_producer" | "kv_consumer", "kv_save": "all" | "layer",
"requests": [{"prompt": str} | {"prompt_token_ids": [...]}, with "sampling"
and optionally "kv_transfer_params"]}``. The output lists, per request, the
prompt's token ids, the generated token ids and text, and the engine's
``kv_transfer_params``. Outputs go to a file: vLLM logs to stdout; the
engine's stderr is kept in the work directory's ``engine.log``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any


def run_engine(request: dict[str, Any], workdir: Path, timeout: float = 600) -> list[dict[str, Any]]:
    """Run the engine described by ``request`` in a subprocess; return its outputs."""
    request_path, output_path = workdir / "engine_request.json", workdir / "engine_output.json"
    request_path.write_text(json.dumps(request))
    done = subprocess.run(
        [sys.executable, __file__, str(request_path), str(output_path)],
        capture_output=True, text=True, timeout=timeout,
    )
    (workdir / "engine.log").write_text(done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"engine run failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(output_path.read_text())


def _main() -> None:
    from vllm import LLM
    from vllm.inputs import TokensPrompt

    from hetserve.engine import with_connector
    from hetserve.logprobs import entries
    from hetserve.sampling import to_sampling_params

    request_path, output_path = sys.argv[1:3]
    request = json.loads(Path(request_path).read_text())
    args = request["engine_args"]
    if request.get("kv_role"):
        args = with_connector(args, request["kv_role"], request.get("kv_save", "all"))
    engine = LLM(**args)
    prompts, params = [], []
    for item in request["requests"]:
        prompts.append(TokensPrompt(prompt_token_ids=item["prompt_token_ids"]) if "prompt_token_ids" in item else item["prompt"])
        sampling = dict(item["sampling"])
        extra = sampling.pop("extra_args", None) or {}
        if "kv_transfer_params" in item:
            extra["kv_transfer_params"] = item["kv_transfer_params"]
        # The client's JSON fields, typed as llm types them (string keys of logit_bias, ...).
        one = to_sampling_params(sampling)
        one.extra_args = extra or None
        params.append(one)
    outputs = engine.generate(prompts, params, use_tqdm=False)
    results = [
        {
            "prompt_token_ids": list(o.prompt_token_ids),
            "token_ids": list(o.outputs[0].token_ids),
            "text": o.outputs[0].text,
            "finish_reason": o.outputs[0].finish_reason,
            "logprobs": entries(o.outputs[0].logprobs),
            "cumulative_logprob": o.outputs[0].cumulative_logprob,
            "kv_transfer_params": o.kv_transfer_params,
        }
        for o in outputs
    ]
    Path(output_path).write_text(json.dumps(results))


if __name__ == "__main__":  # vLLM's CPU platform spawns processes
    _main()
