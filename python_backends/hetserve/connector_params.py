"""The ``kv_transfer_params`` a caller hands to HetserveConnector (see kv/connector.py)."""

from __future__ import annotations

from typing import Any

from hetserve.kv.slots import SlotRef

PARAMS_KEY = "hetserve"


def save_params(ref: SlotRef) -> dict[str, Any]:
    """Producer: write the prompt's KV into the slot ``ref``, then stamp its nonce."""
    return {PARAMS_KEY: {"slot": ref.path, "capacity": ref.capacity, "nonce": ref.nonce}}


def load_params(ref: SlotRef, num_tokens: int) -> dict[str, Any]:
    """Consumer: the slot ``ref`` holds KV for the first ``num_tokens`` prompt tokens."""
    return {PARAMS_KEY: {"slot": ref.path, "capacity": ref.capacity, "nonce": ref.nonce, "num_tokens": num_tokens}}
