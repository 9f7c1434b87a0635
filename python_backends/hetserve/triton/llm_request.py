"""Parsing one client request to the ``llm`` model (Triton vLLM backend semantics)."""

from __future__ import annotations

from dataclasses import dataclass

from hetserve import names
from hetserve.sampling import parse_json
from hetserve.triton.common import input_bool, input_str


@dataclass(frozen=True, slots=True)
class LLMRequest:
    text: str
    stream: bool
    prepend_input: bool  # put the prompt before the generated text
    sampling_parameters: str  # the client's JSON, checked to be an object
    return_finish_reason: bool
    return_num_input_tokens: bool
    return_num_output_tokens: bool


def parse(request) -> LLMRequest:
    """Raise ValueError naming what is wrong with the request."""
    text = input_str(request, names.TEXT_INPUT)
    if text is None:
        raise ValueError("text_input is missing")
    if not text:
        raise ValueError("text_input is empty")
    stream = bool(input_bool(request, names.STREAM))
    exclude = input_bool(request, names.EXCLUDE_INPUT_IN_OUTPUT)
    # As Triton's vLLM backend: the prompt is included unless excluded, and never
    # when streaming.
    prepend = (not exclude) if exclude is not None else not stream
    if prepend and stream:
        raise ValueError("When streaming, `exclude_input_in_output` = False is not allowed.")
    raw = input_str(request, names.SAMPLING_PARAMETERS) or ""
    parse_json(raw)
    return LLMRequest(
        text=text,
        stream=stream,
        prepend_input=prepend,
        sampling_parameters=raw,
        return_finish_reason=bool(input_bool(request, names.RETURN_FINISH_REASON)),
        return_num_input_tokens=bool(input_bool(request, names.RETURN_NUM_INPUT_TOKENS)),
        return_num_output_tokens=bool(input_bool(request, names.RETURN_NUM_OUTPUT_TOKENS)),
    )
