"""Parsing ``sampling_parameters``: JSON of vLLM ``SamplingParams`` fields.

vLLM's own ``SamplingParams`` validates values (it is the single source of
truth); this module adds clear errors for what reaches it malformed.
"""

from __future__ import annotations

import json
from typing import Any

# Fields hetserve sets itself; a client may not.
_RESERVED = {"extra_args", "output_kind", "detokenize"}


def parse_json(raw: str | bytes | None) -> dict[str, Any]:
    """The JSON object of ``sampling_parameters`` (empty when absent)."""
    if raw is None or raw in (b"", ""):
        return {}
    try:
        value = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"sampling_parameters is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError(f"sampling_parameters must be a JSON object, got {type(value).__name__}")
    return value


def to_sampling_params(fields: dict[str, Any]):
    """Build vLLM ``SamplingParams``; ValueError names the offending field."""
    from vllm import SamplingParams
    from vllm.exceptions import VLLMError

    known = {f for f in SamplingParams.__struct_fields__ if not f.startswith("_")} - _RESERVED
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"sampling_parameters has unknown field(s) {unknown}")
    if fields.get("n", 1) != 1 or fields.get("best_of") not in (None, 1):
        raise ValueError("sampling_parameters: only n=1 is supported")
    try:
        return SamplingParams(**fields)
    except (TypeError, ValueError, VLLMError) as exc:
        raise ValueError(f"invalid sampling_parameters: {exc}") from None


def after_first_token(params):
    """The parameters for the rest of a generation whose first token came from prefill."""
    rest = params.clone()
    if rest.max_tokens is not None:
        rest.max_tokens -= 1
    rest.min_tokens = max(rest.min_tokens - 1, 0)
    return rest
