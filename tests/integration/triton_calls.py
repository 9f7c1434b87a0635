"""Calling any of the three models over gRPC streaming with named numpy arrays."""

from __future__ import annotations

import json
import queue

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import np_to_triton_dtype

BF16 = "BF16"


def _input(name: str, value: np.ndarray) -> grpcclient.InferInput:
    dtype = "BYTES" if value.dtype == np.object_ else np_to_triton_dtype(value.dtype)
    item = grpcclient.InferInput(name, list(value.shape), dtype)
    item.set_data_from_numpy(value)
    return item


def strings(*values: str) -> np.ndarray:
    return np.array([v.encode() for v in values], dtype=np.object_)


def ask_llm(url: str, prompt: str, sampling: dict, stream: bool, *flags: str) -> list[dict[str, np.ndarray]]:
    """Every response of ``llm`` to ``prompt``; ``flags``: BOOL inputs to set true (names.RETURN_LOGPROBS, ...)."""
    inputs = {"text_input": strings(prompt), "stream": np.array([stream]), "sampling_parameters": strings(json.dumps(sampling))}
    inputs.update({flag: np.array([True]) for flag in flags})
    return infer_stream(url, "llm", inputs)


def infer_stream(
    url: str, model: str, inputs: dict[str, np.ndarray], timeout: float = 300, parameters: dict | None = None
) -> list[dict[str, np.ndarray]]:
    """Every response of one request to a decoupled model; raise its error if any. ``parameters``: the request's own."""
    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    out = []
    try:
        client.async_stream_infer(
            model, [_input(k, v) for k, v in inputs.items()], enable_empty_final_response=True, parameters=parameters
        )
        while True:
            result, error = responses.get(timeout=timeout)
            if error is not None:
                raise error
            response = result.get_response()
            if response.outputs:
                out.append({o.name: result.as_numpy(o.name) for o in response.outputs})
            if response.parameters["triton_final_response"].bool_param:
                return out
    finally:
        client.stop_stream()
        client.close()


def stream_ids_concurrently(url: str, prompts: list[str], sampling: dict) -> list[list[int]]:
    """Each prompt's generated token ids, all streamed over gRPC at once (batched on the server)."""
    from concurrent.futures import ThreadPoolExecutor

    from hetserve_client import stream_grpc

    def one(prompt: str) -> list[int]:
        return [t for d in stream_grpc(url, prompt, sampling) for t in d.token_ids]

    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(one, prompts))
