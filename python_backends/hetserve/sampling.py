"""Parsing ``sampling_parameters``: JSON of vLLM ``SamplingParams`` fields.

vLLM's own ``SamplingParams`` validates values (it is the single source of
truth); this module adds clear errors for what reaches it malformed, and the
coercions clients rely on with Triton's vLLM backend: numbers and booleans
sent as strings (genai-perf sends ``{"max_tokens": "100"}``), ``logit_bias``
keyed by strings (JSON object keys), ``structured_outputs`` as an object,
and ``null`` for a field that takes no null meaning its default (as an
unset field in vLLM's OpenAI API). A value of the wrong kind (an object for
``stop``, a string for ``bad_words``, an integer that no 64-bit field holds)
is refused with the field named, before vLLM asserts on it or fails to
serialize it.
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
        raise ValueError(f"sampling_parameters must be a JSON object, got {json.dumps(value)[:40]}")
    return value


def from_request_parameters(raw: str | None, stream: bool | None) -> tuple[str, bool | None]:
    """Sampling JSON and the stream flag from a request's own Triton parameters.

    As Triton's vLLM backend: without a ``sampling_parameters`` input, the
    request's parameters (``"parameters"`` of the HTTP generate body, the
    gRPC request's ``parameters``) are the sampling parameters. Their
    ``stream`` (sent so in Triton's vLLM tutorials) stands for the ``stream``
    input when that is absent; both given and different is refused. Names
    Triton reserves (``triton_*``) are not sampling fields and are left out.
    """
    fields = parse_json(raw)
    if fields.get("stream") is not None:  # null: as absent
        value = _scalar("stream", fields.pop("stream"), bool)
        if value in (0, 1) and not isinstance(value, bool):  # gRPC's int64 parameters
            value = bool(value)
        if not isinstance(value, bool):
            raise ValueError(f"parameters: stream must be a boolean, got {value!r}")
        if stream is not None and stream != value:
            raise ValueError(f"the stream input is {stream} but parameters.stream is {value}: send one")
        stream = value
    fields = {k: v for k, v in fields.items() if k != "stream" and not k.startswith("triton_")}
    return (json.dumps(fields) if fields else ""), stream


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


_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1  # what msgpack carries to the engine core
_KINDS = {int: "integer", float: "number", str: "string", bool: "boolean"}
_TAKES = {str: "a string", list: "a list", dict: "an object"}


def _fits(value: Any, kind: type) -> bool:
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool) and _INT_MIN <= value <= _INT_MAX
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, kind)


def _check_kind(name: str, value: Any, hint: Any) -> None:
    """Refuse a list, object, string or integer where ``hint`` takes none, with the field named."""
    args = typing.get_args(hint) or (hint,)
    lists = [a for a in args if typing.get_origin(a) is list]
    if isinstance(value, int) and not isinstance(value, bool) and not _INT_MIN <= value <= _INT_MAX:
        raise ValueError(f"sampling_parameters: {name} is out of range: {value}")
    if isinstance(value, list):
        if not lists:
            return  # a scalar field: _scalar refused it; others (arrays) are vLLM's to check
        item = (typing.get_args(lists[0]) or (Any,))[0]
        bad = [v for v in value if item in _KINDS and not _fits(v, item)]
        if bad:
            raise ValueError(f"sampling_parameters: {name} must be a list of {_KINDS[item]}s, got {bad[0]!r} in it")
    elif isinstance(value, dict):
        if not any(typing.get_origin(a) is dict or (isinstance(a, type) and a not in (*_KINDS, type(None))) for a in args):
            raise ValueError(f"sampling_parameters: {name} must not be an object")
    elif isinstance(value, str) and lists and str not in args:
        raise ValueError(f"sampling_parameters: {name} must be a list, got a string")
    elif isinstance(value, (int, float)) and Any not in args and not any(a in (int, float, bool) for a in args):
        takes = sorted({_TAKES.get(typing.get_origin(a) or a, "an object") for a in args if a is not type(None)})
        raise ValueError(f"sampling_parameters: {name} must be {' or '.join(takes)}, got {value!r}")


def _coerce(fields: dict[str, Any]) -> dict[str, Any]:
    from vllm.exceptions import VLLMError
    from vllm.sampling_params import StructuredOutputsParams

    types = _field_types()
    # null where the field takes none: its default, as an unset field.
    fields = {k: v for k, v in fields.items() if v is not None or type(None) in typing.get_args(types[k])}
    out = {name: _scalar(name, value, types[name]) for name, value in fields.items()}
    for name, value in out.items():
        _check_kind(name, value, types[name])
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
    except AssertionError as exc:  # vLLM asserts some types; say where at least
        raise ValueError(f"invalid sampling_parameters: {exc or 'a field of the wrong type'}") from None
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
    except (msgspec.ValidationError, msgspec.EncodeError, TypeError, OverflowError) as exc:
        raise ValueError(f"invalid sampling_parameters: {exc}".replace("`$.", "`")) from None
