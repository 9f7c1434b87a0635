"""``hetserve bench streams``: many concurrent streams through ``llm``, each checked.

``--streams`` (default 1,000) greedy requests of distinct prompts (3 to 80
words: both sides of the local-prefill length) at once, twice: as that many
separate gRPC streams (``ModelStreamInfer`` calls on one channel), then all
multiplexed on one stream, as perf_analyzer sends them. Every output is
compared, token for token, with offline vLLM's on the same prompts and engine
settings. Prints the wall time, how many were exact and the errors.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time

import numpy as np

from hetserve import names
from hetserve.checkpoint import _WORDS


def grpc_inputs(prompt: str, sampling: dict):
    import tritonclient.grpc as grpcclient

    tensors = []
    for name, value, dtype in (
        (names.TEXT_INPUT, np.array([prompt.encode()], dtype=np.object_), "BYTES"),
        (names.SAMPLING_PARAMETERS, np.array([json.dumps(sampling).encode()], dtype=np.object_), "BYTES"),
        (names.STREAM, np.array([True]), "BOOL"),
    ):
        tensor = grpcclient.InferInput(name, [1], dtype)
        tensor.set_data_from_numpy(value)
        tensors.append(tensor)
    return tensors


async def separate(url: str, prompts: list[str], sampling: dict) -> list[tuple[list[int], str | None]]:
    """One ModelStreamInfer call per request, all at once."""
    from tritonclient.grpc.aio import InferenceServerClient

    client = InferenceServerClient(url)

    async def one(i: int):
        async def request():
            yield {"model_name": "llm", "inputs": grpc_inputs(prompts[i], sampling), "request_id": str(i)}

        ids: list[int] = []
        async for result, error in client.stream_infer(request()):
            if error is not None:
                return ids, str(error)
            out = result.as_numpy(names.OUTPUT_IDS)
            if out is not None:
                ids += out.reshape(-1).tolist()
            if len(ids) >= sampling["max_tokens"]:
                break
        return ids, None

    try:
        return await asyncio.gather(*(one(i) for i in range(len(prompts))))
    finally:
        await client.close()


async def multiplexed(url: str, prompts: list[str], sampling: dict) -> list[tuple[list[int], str | None]]:
    """Every request on one ModelStreamInfer call."""
    from tritonclient.grpc.aio import InferenceServerClient

    client = InferenceServerClient(url)

    async def requests():
        for i, prompt in enumerate(prompts):
            yield {"model_name": "llm", "inputs": grpc_inputs(prompt, sampling), "request_id": str(i)}

    ids: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    errors: list[str] = []
    finished: set[int] = set()
    try:
        async for result, error in client.stream_infer(requests()):
            if error is not None:  # the stream's errors carry no request id
                errors.append(str(error))
            else:
                i = int(result.get_response().id)
                out = result.as_numpy(names.OUTPUT_IDS)
                if out is not None:
                    ids[i] += out.reshape(-1).tolist()
                if len(ids[i]) >= sampling["max_tokens"]:
                    finished.add(i)
            if len(finished) + len(errors) >= len(prompts):
                break
    finally:
        await client.close()
    return [(ids[i], None) for i in ids] + [([], e) for e in errors]


def main(argv: list[str] | None = None) -> int:
    from hetserve.bench import offline
    from hetserve.bench.server import started
    from hetserve.launcher import ServeOptions, engine_settings

    parser = argparse.ArgumentParser(prog="hetserve bench streams", description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args(argv)

    rng = random.Random(7)
    prompts = [f"{i} " + " ".join(rng.choice(_WORDS) for _ in range(rng.choice([3, 8, 40, 80]))) for i in range(args.streams)]
    sampling = {"max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True}
    engine_args = {**engine_settings(ServeOptions(), names.Model.LLM), "enable_prefix_caching": False}
    want = offline.run(engine_args, args.max_tokens, 1, prompts=prompts)["token_ids"]
    with started(None, {}) as (_, grpc_url, _, _):
        for mode, run in (("separate streams", separate), ("one multiplexed stream", multiplexed)):
            start = time.perf_counter()
            outputs = asyncio.run(run(grpc_url, prompts, sampling))
            seconds = time.perf_counter() - start
            exact = sum(ids == w for (ids, error), w in zip(outputs, want) if error is None)
            errors = [error for _, error in outputs if error is not None]
            print(f"{args.streams} requests, {mode}: {seconds:.1f} s, {exact} exact, {len(errors)} errors {errors[:3]}", flush=True)
    return 0
