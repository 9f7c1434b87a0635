"""The ``kv_transfer_params`` a caller hands to HetserveConnector (see kv/connector.py)."""

from __future__ import annotations

from typing import Any

from hetserve.kv.buffers import ShmBuffer

PARAMS_KEY = "hetserve"


def save_params(buf: ShmBuffer) -> dict[str, Any]:
    """Producer: write the prompt's KV into ``buf``."""
    return {PARAMS_KEY: {"save": buf.path, "nbytes": buf.nbytes}}


def load_params(buf: ShmBuffer, num_tokens: int) -> dict[str, Any]:
    """Consumer: ``buf`` holds KV for the first ``num_tokens`` prompt tokens."""
    return {PARAMS_KEY: {"load": buf.path, "nbytes": buf.nbytes, "num_tokens": num_tokens}}
