"""Small helpers over ``triton_python_backend_utils`` shared by the three models."""

from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def input_tensor(request, name: str):
    return pb_utils.get_input_tensor_by_name(request, name)


def input_str(request, name: str) -> str | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    values = tensor.as_numpy().reshape(-1)
    if values.size != 1:
        raise ValueError(f"{name} must hold exactly one string, got {values.size}")
    value = values[0]
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{name} is not valid UTF-8: {exc}") from None
    return str(value)


def input_bool(request, name: str) -> bool | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    values = tensor.as_numpy().reshape(-1)
    if values.size != 1:
        raise ValueError(f"{name} must hold exactly one value, got {values.size}")
    return bool(values[0])


def input_ids(request, name: str) -> list[int] | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy().reshape(-1).tolist()


def string_tensor(name: str, *values: str):
    return pb_utils.Tensor(name, np.array([v.encode("utf-8") for v in values], dtype=np.object_))


def ids_tensor(name: str, ids) -> "pb_utils.Tensor":
    return pb_utils.Tensor(name, np.asarray(ids, dtype=np.int64).reshape(-1))


def error_response(message: str, code=None):
    code = pb_utils.TritonError.INTERNAL if code is None else code
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))


def send_error(sender, message: str, code=None) -> None:
    sender.send(error_response(message, code), flags=FINAL)


def invalid_arg():
    return pb_utils.TritonError.INVALID_ARG


def cancelled():
    return pb_utils.TritonError.CANCELLED


def setup_logging() -> None:
    """Send hetserve's log records to the server's log (the stub's stderr)."""
    import logging

    logger = logging.getLogger("hetserve")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
