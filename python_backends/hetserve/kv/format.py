"""The engine-independent KV interchange format.

One request's KV for all layers is one C-contiguous tensor
``[layers, 2 (k|v), kv_heads, tokens, head_dim]``, post-RoPE (what HF
``past_key_values`` hold), together with the prompt token ids it covers and a
model fingerprint. A consumer refuses KV whose fingerprint, shape, dtype or token
count does not match its own model, with an error naming what differs.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

import torch

# Triton's data type names for the dtypes the interchange carries.
TRITON_DTYPES: dict[torch.dtype, str] = {
    torch.float32: "FP32",
    torch.float16: "FP16",
    torch.bfloat16: "BF16",
}
_DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def dtype_name(dtype: torch.dtype) -> str:
    for name, value in _DTYPE_NAMES.items():
        if value == dtype:
            return name
    raise ValueError(f"KV dtype {dtype} is not supported by the interchange format")


def torch_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPE_NAMES[name]
    except KeyError:
        raise ValueError(f"unknown KV dtype {name!r}; expected one of {sorted(_DTYPE_NAMES)}") from None


class KVMismatchError(ValueError):
    """KV that does not fit the consumer's model."""


@dataclass(frozen=True, slots=True)
class ModelFingerprint:
    """What must agree between producer and consumer for KV to be reusable."""

    architecture: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    rope: str  # canonical JSON of the rotary settings
    dtype: str  # torch dtype name of the KV values

    def __post_init__(self) -> None:
        for field in ("num_layers", "num_kv_heads", "head_dim"):
            if getattr(self, field) <= 0:
                raise ValueError(f"fingerprint {field} must be positive, got {getattr(self, field)}")
        torch_dtype(self.dtype)

    @classmethod
    def from_hf_config(cls, hf_config: Any, dtype: torch.dtype | str) -> "ModelFingerprint":
        text = getattr(hf_config, "text_config", None) or hf_config
        heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        rope = getattr(text, "rope_parameters", None) or {
            "rope_theta": getattr(text, "rope_theta", None),
            "rope_scaling": getattr(text, "rope_scaling", None),
        }
        archs = getattr(hf_config, "architectures", None) or [type(hf_config).__name__]
        return cls(
            architecture=archs[0],
            num_layers=text.num_hidden_layers,
            num_kv_heads=getattr(text, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            rope=json.dumps(rope, sort_keys=True, default=str),
            dtype=dtype if isinstance(dtype, str) else dtype_name(dtype),
        )

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch_dtype(self.dtype)

    @property
    def bytes_per_token(self) -> int:
        itemsize = torch.empty((), dtype=self.torch_dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize

    def kv_shape(self, num_tokens: int) -> tuple[int, int, int, int, int]:
        return (self.num_layers, 2, self.num_kv_heads, num_tokens, self.head_dim)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> "ModelFingerprint":
        try:
            fields = json.loads(text)
            return cls(**fields)
        except (TypeError, ValueError) as exc:
            raise KVMismatchError(f"kv_fingerprint is not a valid fingerprint: {exc}") from None


def validate_kv(
    expected: ModelFingerprint,
    received: ModelFingerprint,
    kv: torch.Tensor,
    token_ids: torch.Tensor,
    max_tokens: int,
) -> None:
    """Raise KVMismatchError naming the first thing that does not match."""
    if received != expected:
        diffs = [
            f"{name}: got {getattr(received, name)!r}, expected {getattr(expected, name)!r}"
            for name in expected.__slots__
            if getattr(received, name) != getattr(expected, name)
        ]
        raise KVMismatchError("KV model fingerprint does not match this model (" + "; ".join(diffs) + ")")
    if kv.dtype != expected.torch_dtype:
        raise KVMismatchError(f"KV dtype is {kv.dtype}, expected {expected.torch_dtype}")
    if token_ids.dim() != 1 or token_ids.numel() == 0:
        raise KVMismatchError(f"kv_token_ids must be a non-empty 1-D tensor, got shape {tuple(token_ids.shape)}")
    num_tokens = token_ids.numel()
    if num_tokens > max_tokens:
        raise KVMismatchError(f"KV covers {num_tokens} tokens, more than this model accepts ({max_tokens})")
    want = expected.kv_shape(num_tokens)
    if tuple(kv.shape) != want:
        raise KVMismatchError(
            f"KV shape is {tuple(kv.shape)}, expected {want} "
            "([layers, 2, kv_heads, tokens, head_dim] for the given kv_token_ids)"
        )
    if not kv.is_contiguous():
        raise KVMismatchError("KV tensor must be C-contiguous")
