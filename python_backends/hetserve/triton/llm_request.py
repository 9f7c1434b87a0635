"""Parsing one client request to the ``llm`` model (Triton vLLM backend semantics)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from hetserve import names
from hetserve.kv.format import ModelFingerprint, validate_kv
from hetserve.sampling import from_request_parameters, parse_json
from hetserve.triton.common import input_bool, input_str, input_tensor

_KV_INPUTS = (names.KV_CACHE, names.KV_TOKEN_IDS, names.KV_FINGERPRINT, names.INPUT_IDS)


@dataclass(frozen=True, slots=True)
class LLMRequest:
    text: str | None  # None when the client sends KV instead
    stream: bool
    prepend_input: bool  # put the prompt before the generated text
    sampling_parameters: str  # the client's JSON (or its request parameters'), checked to be an object
    return_finish_reason: bool
    return_num_input_tokens: bool
    return_num_output_tokens: bool
    return_logprobs: bool
    return_cumulative_logprob: bool


@dataclass(slots=True)
class ClientKV:
    """KV a client sent itself, checked against the model."""

    kv: torch.Tensor  # [L, 2, H, T, D], a view of the request's input (Triton's shared memory)
    kv_ids: list[int]  # the T tokens it covers
    new_ids: list[int]  # the tokens after them (at least the first generated one)


def parse(request) -> LLMRequest:
    """Raise ValueError naming what is wrong with the request."""
    text = input_str(request, names.TEXT_INPUT)
    if text == "":
        raise ValueError("text_input is empty")
    stream = input_bool(request, names.STREAM)
    raw = input_str(request, names.SAMPLING_PARAMETERS)
    if raw is None:  # as Triton's vLLM backend: the request's own parameters instead
        raw, stream = from_request_parameters(request.parameters(), stream)
    parse_json(raw)
    stream = bool(stream)
    exclude = input_bool(request, names.EXCLUDE_INPUT_IN_OUTPUT)
    # As Triton's vLLM backend: the prompt is included unless excluded, and never
    # when streaming.
    prepend = (not exclude) if exclude is not None else not stream
    if prepend and stream:
        raise ValueError("When streaming, `exclude_input_in_output` = False is not allowed.")
    return LLMRequest(
        text=text,
        stream=stream,
        prepend_input=prepend,
        sampling_parameters=raw,
        return_finish_reason=bool(input_bool(request, names.RETURN_FINISH_REASON)),
        return_num_input_tokens=bool(input_bool(request, names.RETURN_NUM_INPUT_TOKENS)),
        return_num_output_tokens=bool(input_bool(request, names.RETURN_NUM_OUTPUT_TOKENS)),
        return_logprobs=bool(input_bool(request, names.RETURN_LOGPROBS)),
        return_cumulative_logprob=bool(input_bool(request, names.RETURN_CUMULATIVE_LOGPROB)),
    )


def client_kv(request, fingerprint: ModelFingerprint, max_tokens: int, check_ids) -> ClientKV | None:
    """The KV inputs, all or none; refused with a KVMismatchError naming what differs.

    ``check_ids(ids, name)`` checks token ids against the vocabulary and context.
    """
    tensors = {name: input_tensor(request, name) for name in _KV_INPUTS}
    missing = [name for name, tensor in tensors.items() if tensor is None]
    if len(missing) == len(_KV_INPUTS):
        return None
    if missing == [name for name in _KV_INPUTS if name != names.INPUT_IDS]:
        raise ValueError(
            f"{names.INPUT_IDS} are the tokens that follow a client's KV ({', '.join(missing)}); "
            f"send a prompt as {names.TEXT_INPUT}"
        )
    if missing:
        raise ValueError(f"KV sent without input(s) {missing}: send all of {list(_KV_INPUTS)}")
    # Zero-copy views of the tensors in this stub's shared memory.
    kv = torch.from_dlpack(tensors[names.KV_CACHE].to_dlpack())
    kv_ids = torch.from_dlpack(tensors[names.KV_TOKEN_IDS].to_dlpack())
    received = ModelFingerprint.from_json(input_str(request, names.KV_FINGERPRINT) or "")
    # One token must be left to compute, and room for one more to generate.
    validate_kv(fingerprint, received, kv, kv_ids, max_tokens)
    new_ids = tensors[names.INPUT_IDS].as_numpy().reshape(-1)
    if new_ids.size == 0:
        raise ValueError("input_ids is empty: the model needs the token(s) that follow the KV")
    prompt = check_ids(np.concatenate([kv_ids.numpy(), new_ids]), f"{names.KV_TOKEN_IDS} + {names.INPUT_IDS}")
    return ClientKV(kv, prompt[: kv_ids.numel()], prompt[kv_ids.numel() :])
