"""Streaming over gRPC (tritonclient) and one-shot generation over HTTP.

HTTP uses Triton's generate extension (``POST /v2/models/<m>/generate``): the
``/infer`` endpoint does not serve decoupled models.
"""

from __future__ import annotations

import json
import queue
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from hetserve import names

DEFAULT_MODEL = names.Model.LLM.value


@dataclass(slots=True)
class Delta:
    """One streamed response: new text and token ids."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None


@dataclass(slots=True)
class Completion:
    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    num_input_tokens: int | None = None
    num_output_tokens: int | None = None


def _grpc_inputs(prompt: str, sampling: dict[str, Any], stream: bool) -> list[grpcclient.InferInput]:
    def tensor(name: str, value, dtype: str, np_dtype) -> grpcclient.InferInput:
        item = grpcclient.InferInput(name, [1], dtype)
        item.set_data_from_numpy(np.array([value], dtype=np_dtype))
        return item

    return [
        tensor(names.TEXT_INPUT, prompt.encode(), "BYTES", np.object_),
        tensor(names.STREAM, stream, "BOOL", bool),
        tensor(names.SAMPLING_PARAMETERS, json.dumps(sampling).encode(), "BYTES", np.object_),
        tensor(names.EXCLUDE_INPUT_IN_OUTPUT, True, "BOOL", bool),
        tensor(names.RETURN_FINISH_REASON, True, "BOOL", bool),
    ]


def _delta(result) -> Delta:
    text = result.as_numpy(names.TEXT_OUTPUT)
    ids = result.as_numpy(names.OUTPUT_IDS)
    finish = result.as_numpy(names.FINISH_REASON)
    reason = finish.reshape(-1)[0].decode() if finish is not None else None
    return Delta(
        text="".join(t.decode() for t in text.reshape(-1)) if text is not None else "",
        token_ids=ids.reshape(-1).tolist() if ids is not None else [],
        finish_reason=None if reason in (None, "None") else reason,
    )


def stream_grpc(
    url: str, prompt: str, sampling: dict[str, Any] | None = None, model: str = DEFAULT_MODEL, timeout: float = 600.0
) -> Iterator[Delta]:
    """Yield the completion's deltas as the server streams them.

    Closing the generator early cancels the request on the server.
    """
    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    finished = False
    try:
        try:
            client.async_stream_infer(model, _grpc_inputs(prompt, sampling or {}, stream=True), enable_empty_final_response=True)
        except InferenceServerException:
            # The stream failed already ("no longer in valid state"); its callback has the cause.
            try:
                _, error = responses.get(timeout=1)
            except queue.Empty:
                error = None
            if error is None:
                raise
            finished = True
            raise error from None
        while not finished:
            result, error = responses.get(timeout=timeout)
            if error is not None:
                finished = True
                raise error
            finished = result.get_response().parameters["triton_final_response"].bool_param
            if result.get_response().outputs:
                yield _delta(result)
    finally:
        client.stop_stream(cancel_requests=not finished)
        client.close()


def generate_http(
    url: str,
    prompt: str,
    sampling: dict[str, Any] | str | None = None,
    model: str = DEFAULT_MODEL,
    timeout: float = 600.0,
    exclude_input_in_output: bool = True,
) -> Completion:
    """One non-streamed completion through the HTTP generate endpoint.

    ``sampling`` is a dict of vLLM SamplingParams fields, or their JSON as is.
    """
    body = {
        names.TEXT_INPUT: prompt,
        names.STREAM: False,
        names.SAMPLING_PARAMETERS: sampling if isinstance(sampling, str) else json.dumps(sampling or {}),
        names.EXCLUDE_INPUT_IN_OUTPUT: exclude_input_in_output,
        names.RETURN_FINISH_REASON: True,
        names.RETURN_NUM_INPUT_TOKENS: True,
        names.RETURN_NUM_OUTPUT_TOKENS: True,
    }
    request = urllib.request.Request(
        f"http://{url}/v2/models/{model}/generate",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            out = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        message = exc.read().decode(errors="replace")
        try:
            message = json.loads(message).get("error", message)
        except ValueError:
            pass
        raise InferenceServerException(msg=message, status=str(exc.code)) from None
    return completion_of(out)


def completion_of(out: dict[str, Any]) -> Completion:
    """The Completion in a generate endpoint's JSON answer.

    Triton writes a one-element output as a bare value: one generated token
    comes back as ``"output_ids": 514``, not ``[514]``.
    """
    text = out[names.TEXT_OUTPUT]
    return Completion(
        text=text if isinstance(text, str) else "".join(text),
        token_ids=_listed(out.get(names.OUTPUT_IDS, [])),
        finish_reason=_first(out.get(names.FINISH_REASON)),
        num_input_tokens=_first(out.get(names.NUM_INPUT_TOKENS)),
        num_output_tokens=_first(out.get(names.NUM_OUTPUT_TOKENS)),
    )


def _first(value):
    return value[0] if isinstance(value, list) else value


def _listed(value) -> list:
    return list(value) if isinstance(value, list) else [value]


def wait_ready(http_url: str, timeout: float) -> None:
    """Block until the server at ``http_url`` reports ready."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://{http_url}/v2/health/ready", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"server at {http_url} not ready after {timeout:.0f} s")
        time.sleep(0.5)


def scrape_metrics(metrics_url: str) -> dict[str, float]:
    """Every sample on a server's metrics port (``HOST:PORT``), keyed by name and labels as printed."""
    with urllib.request.urlopen(f"http://{metrics_url}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            samples[key] = float(value)
    return samples
