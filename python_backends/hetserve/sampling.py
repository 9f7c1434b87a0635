"""Parsing ``sampling_parameters``: JSON of vLLM ``SamplingParams`` fields.

vLLM's own ``SamplingParams`` validates values (it is the single source of
truth); this module adds clear errors for what reaches it malformed, and the
coercions clients rely on with Triton's vLLM backend: numbers and booleans
sent as strings (genai-perf sends ``{"max_tokens": "100"}``), ``logit_bias``
keyed by strings (JSON object keys), ``structured_outputs`` as an object.
"""

from __future__ import annotations

import functools
import json
import typing
from typing import Any

# Fields hetserve sets itself, or that only make sense inside one process.
_RESERVED = {"extra_args", "output_kind", "detokenize", "skip_clone", "output_text_buffer_length"}
MAX_JSON_BYTES = 1 << 20
_TRUE, _FALSE = {"true", "1"}, {"false", "0"}


def parse_json(raw: str | bytes | None) -> dict[str, Any]:
    """The JSON object of ``sampling_parameters`` (empty when absent)."""
    if raw is None or raw in (b"", ""):
        return {}
    if len(raw) > MAX_JSON_BYTES:
        raise ValueError(f"sampling_parameters is {len(raw)} bytes, more than {MAX_JSON_BYTES}")
    try:
        value = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"sampling_parameters is not valid JSON: {exc}") from None
    except RecursionError:
        raise ValueError("sampling_parameters is nested too deeply") from None
    if not isinstance(value, dict):
        raise ValueError(f"sampling_parameters must be a JSON object, got {type(value).__name__}")
    return value


@functools.cache
def _field_types() -> dict[str, Any]:
    from vllm import SamplingParams

    return {k: v for k, v in typing.get_type_hints(SamplingParams).items() if not k.startswith("_")}


def _scalar(name: str, value: Any, hint: Any) -> Any:
    """``value`` as the int, float or bool that ``hint`` names, if it came as a string."""
    targets = [t for t in (typing.get_args(hint) or (hint,)) if t in (int, float, bool)]
    if not targets:
        return value
    if isinstance(value, (list, dict)):
        raise ValueError(f"sampling_parameters: {name} must be {targets[0].__name__}, got {type(value).__name__}")
    if not isinstance(value, str):
        return value
    target, text = targets[0], value.strip()
    try:
        if target is bool:
            if text.lower() in _TRUE | _FALSE:
                return text.lower() in _TRUE
            raise ValueError
        return target(text)
    except ValueError:
        raise ValueError(f"sampling_parameters: {name} must be {target.__name__}, got {value!r}") from None


def _coerce(fields: dict[str, Any]) -> dict[str, Any]:
    from vllm.exceptions import VLLMError
    from vllm.sampling_params import StructuredOutputsParams

    types = _field_types()
    out = {name: _scalar(name, value, types[name]) for name, value in fields.items()}
    bias = out.get("logit_bias")
    if isinstance(bias, dict):
        try:
            out["logit_bias"] = {int(k): float(v) for k, v in bias.items()}
        except (TypeError, ValueError):
            raise ValueError("sampling_parameters: logit_bias must map token ids to numbers") from None
    structured = out.get("structured_outputs")
    if isinstance(structured, dict):
        try:
            out["structured_outputs"] = StructuredOutputsParams(**structured)
        except (TypeError, ValueError, VLLMError) as exc:
            raise ValueError(f"sampling_parameters: structured_outputs: {exc}") from None
    return out


def to_sampling_params(fields: dict[str, Any]):
    """Build vLLM ``SamplingParams``; ValueError names the offending field."""
    from vllm import SamplingParams
    from vllm.exceptions import VLLMError

    known = set(_field_types()) - _RESERVED
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"sampling_parameters has unknown field(s) {unknown}")
    fields = _coerce(fields)
    if fields.get("n", 1) != 1:
        raise ValueError("sampling_parameters: only n=1 is supported")
    try:
        params = SamplingParams(**fields)
    except (TypeError, ValueError, VLLMError) as exc:
        raise ValueError(f"invalid sampling_parameters: {exc}") from None
    _check_wire_types(params)
    return params


def _check_wire_types(params) -> None:
    """Check the field types as vLLM's engine core will, here, per request.

    ``SamplingParams(...)`` takes any type (``logit_bias=[1, 2]``,
    ``seed=1.5``, ``bad_words=[1]``); the engine core type-checks each request
    when it decodes it (msgspec), in its input thread, and a failure there
    kills that thread: the engine takes no request after it. So a request is
    put through the same decoding first, and refused with the field named.
    """
    import msgspec
    from vllm import SamplingParams

    try:
        msgspec.msgpack.decode(msgspec.msgpack.encode(params), type=SamplingParams)
    except (msgspec.ValidationError, msgspec.EncodeError, TypeError) as exc:
        raise ValueError(f"invalid sampling_parameters: {exc}".replace("`$.", "`")) from None
