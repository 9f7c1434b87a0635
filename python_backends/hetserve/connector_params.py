"""The ``kv_transfer_params`` a caller hands to HetserveConnector (see kv/connector.py)."""

from __future__ import annotations

from typing import Any

from hetserve.kv.slots import SlotRef
from hetserve.kv.transfer import AUTO

PARAMS_KEY = "hetserve"
EARLY_WAIT_KEY = "early_wait_s"  # a load's params with it: an early load (kv/early.py)


def _params(ref: SlotRef, dtype: str, **more: Any) -> dict[str, Any]:
    params = {"slot": ref.path, "capacity": ref.capacity, "nonce": ref.nonce, **more}
    if dtype != AUTO:
        params["dtype"] = dtype
    return {PARAMS_KEY: params}


def save_params(ref: SlotRef, dtype: str = AUTO) -> dict[str, Any]:
    """Producer: write the prompt's KV into the slot ``ref`` (encoded in the transfer ``dtype``), then stamp its nonce."""
    return _params(ref, dtype)


def load_params(ref: SlotRef, num_tokens: int, dtype: str = AUTO, early_wait_s: float | None = None) -> dict[str, Any]:
    """Consumer: the slot ``ref`` holds KV for the first ``num_tokens`` prompt tokens (in ``dtype``).

    ``early_wait_s``: an early load: the slot is still being written; the
    worker waits for it (and for the first token in its header) at most this
    long, while the engine goes on with other requests.
    """
    if early_wait_s is None:
        return _params(ref, dtype, num_tokens=num_tokens)
    return _params(ref, dtype, num_tokens=num_tokens, **{EARLY_WAIT_KEY: float(early_wait_s)})
