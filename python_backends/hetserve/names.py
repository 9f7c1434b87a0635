"""Model and tensor names, defined once for the models, the client and the tests.

The ``llm`` model speaks Triton's vLLM backend interface (plus optional KV
inputs, for a client that sends KV itself); ``prefill`` speaks hetserve's
internal one: the prompt in, the first token and the KV (a reference to a slot,
or the interchange tensor) out.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Model(str, Enum):
    LLM = "llm"
    PREFILL = "prefill"
    UNIFIED = "unified"  # the A/B baseline: llm's interface, one engine, no prefill tier


# Client-facing names (Triton vLLM backend).
TEXT_INPUT = "text_input"
STREAM = "stream"
SAMPLING_PARAMETERS = "sampling_parameters"
EXCLUDE_INPUT_IN_OUTPUT = "exclude_input_in_output"
RETURN_FINISH_REASON = "return_finish_reason"
RETURN_NUM_INPUT_TOKENS = "return_num_input_tokens"
RETURN_NUM_OUTPUT_TOKENS = "return_num_output_tokens"
RETURN_LOGPROBS = "return_logprobs"
RETURN_CUMULATIVE_LOGPROB = "return_cumulative_logprob"
TEXT_OUTPUT = "text_output"
FINISH_REASON = "finish_reason"
NUM_INPUT_TOKENS = "num_input_tokens"
NUM_OUTPUT_TOKENS = "num_output_tokens"
LOGPROBS = "logprobs"  # JSON: per token, {token_id: {logprob, rank, decoded_token}}
CUMULATIVE_LOGPROB = "cumulative_logprob"
# hetserve extension: the token ids of each response, for exact comparisons.
OUTPUT_IDS = "output_ids"

# Internal names: the KV interchange and the request id shared by both halves.
KV_CACHE = "kv_cache"
KV_TOKEN_IDS = "kv_token_ids"
KV_FINGERPRINT = "kv_fingerprint"
KV_SLOT = "kv_slot"  # prefill input: the slot to write the KV into (slots.SlotRef JSON)
KV_REF = "kv_ref"  # prefill output: what was written (JSON: num_tokens, copy times, transfer_dtype)
KV_DTYPE_INPUT = "kv_dtype"  # prefill input: the transfer dtype of kv_cache (kv/transfer.py; default auto)
KV_SCALES = "kv_scales"  # prefill output: int8/fp8 kv_cache's scales [L, 2, H, T], float32
INPUT_IDS = "input_ids"
REQUEST_ID = "request_id"


@dataclass(frozen=True, slots=True)
class TensorSpec:
    name: str
    data_type: str  # Triton TYPE_* without the prefix
    dims: tuple[int, ...]
    optional: bool = False


_KV_DIMS = (-1, -1, -1, -1, -1)  # [layers, 2, kv_heads, tokens, head_dim]
# KV_DTYPE stands for the model's KV dtype; the launcher writes the real one.
KV_DTYPE = "KV"

_KV_INPUTS = (
    TensorSpec(KV_CACHE, KV_DTYPE, _KV_DIMS, optional=True),
    TensorSpec(KV_TOKEN_IDS, "INT64", (-1,), optional=True),
    TensorSpec(KV_FINGERPRINT, "STRING", (1,), optional=True),
    TensorSpec(INPUT_IDS, "INT64", (-1,), optional=True),
)

IO: dict[Model, dict[str, tuple[TensorSpec, ...]]] = {
    Model.LLM: {
        "inputs": (
            TensorSpec(TEXT_INPUT, "STRING", (1,), optional=True),
            TensorSpec(STREAM, "BOOL", (1,), optional=True),
            TensorSpec(SAMPLING_PARAMETERS, "STRING", (1,), optional=True),
            TensorSpec(EXCLUDE_INPUT_IN_OUTPUT, "BOOL", (1,), optional=True),
            TensorSpec(RETURN_FINISH_REASON, "BOOL", (1,), optional=True),
            TensorSpec(RETURN_NUM_INPUT_TOKENS, "BOOL", (1,), optional=True),
            TensorSpec(RETURN_NUM_OUTPUT_TOKENS, "BOOL", (1,), optional=True),
            TensorSpec(RETURN_LOGPROBS, "BOOL", (1,), optional=True),
            TensorSpec(RETURN_CUMULATIVE_LOGPROB, "BOOL", (1,), optional=True),
            *_KV_INPUTS,  # KV a client sends itself: kv_token_ids + input_ids are the prompt
        ),
        "outputs": (
            TensorSpec(TEXT_OUTPUT, "STRING", (-1,)),
            TensorSpec(FINISH_REASON, "STRING", (-1,)),
            TensorSpec(NUM_INPUT_TOKENS, "UINT32", (1,)),
            TensorSpec(NUM_OUTPUT_TOKENS, "UINT32", (-1,)),
            TensorSpec(OUTPUT_IDS, "INT64", (-1,)),
            TensorSpec(LOGPROBS, "STRING", (-1,)),
            TensorSpec(CUMULATIVE_LOGPROB, "FP32", (-1,)),
        ),
    },
    Model.PREFILL: {
        "inputs": (
            TensorSpec(TEXT_INPUT, "STRING", (1,), optional=True),
            TensorSpec(INPUT_IDS, "INT64", (-1,), optional=True),
            TensorSpec(SAMPLING_PARAMETERS, "STRING", (1,), optional=True),
            TensorSpec(REQUEST_ID, "STRING", (1,), optional=True),
            TensorSpec(KV_SLOT, "STRING", (1,), optional=True),
            TensorSpec(KV_DTYPE_INPUT, "STRING", (1,), optional=True),
        ),
        "outputs": (
            TensorSpec(OUTPUT_IDS, "INT64", (-1,)),
            TensorSpec(FINISH_REASON, "STRING", (1,)),
            TensorSpec(KV_TOKEN_IDS, "INT64", (-1,)),
            TensorSpec(KV_FINGERPRINT, "STRING", (1,)),
            TensorSpec(KV_REF, "STRING", (1,)),
            TensorSpec(LOGPROBS, "STRING", (1,)),  # the first token's, or "null"
            TensorSpec(KV_CACHE, KV_DTYPE, _KV_DIMS),  # only without kv_slot (tensor transport), in kv_dtype
            TensorSpec(KV_SCALES, "FP32", (-1, -1, -1, -1)),  # only with kv_dtype int8 or fp8_e4m3
        ),
    },
}
IO[Model.UNIFIED] = IO[Model.LLM]
