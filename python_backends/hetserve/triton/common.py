"""Small helpers over ``triton_python_backend_utils`` shared by the three models."""

from __future__ import annotations

import asyncio
import logging

import numpy as np
import triton_python_backend_utils as pb_utils

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def input_tensor(request, name: str):
    return pb_utils.get_input_tensor_by_name(request, name)


def _single(request, name: str):
    """The one value of an optional input, or None when it is absent."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    values = tensor.as_numpy().reshape(-1)
    if values.size != 1:
        raise ValueError(f"{name} must hold exactly one value, got {values.size}")
    return values[0]


def input_str(request, name: str) -> str | None:
    value = _single(request, name)
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{name} is not valid UTF-8: {exc}") from None
    return None if value is None else str(value)


def input_bool(request, name: str) -> bool | None:
    value = _single(request, name)
    return None if value is None else bool(value)


def input_ids(request, name: str) -> np.ndarray | None:
    """A 1-D INT64 input (token ids), or None when absent."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy().reshape(-1)


def string_tensor(name: str, *values: str):
    return pb_utils.Tensor(name, np.array([v.encode("utf-8") for v in values], dtype=np.object_))


def ids_tensor(name: str, ids) -> "pb_utils.Tensor":
    return pb_utils.Tensor(name, np.asarray(ids, dtype=np.int64).reshape(-1))


def error_response(message: str, code=None):
    code = pb_utils.TritonError.INTERNAL if code is None else code
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))


class Responder:
    """A request's response sender that remembers whether it sent the final response.

    Asking a finished request whether it was cancelled crashes tritonserver 2.51
    (a segfault in TRITONBACKEND_ResponseFactoryIsCancelled: the factory is
    gone), so ``is_cancelled`` answers False without asking once it is final.
    """

    __slots__ = ("_sender", "finished")

    def __init__(self, request):
        self._sender = request.get_response_sender()
        self.finished = False

    def send(self, response=None, final: bool = False) -> None:
        if self.finished:
            raise RuntimeError("a response after the final one")
        self.finished = final
        self._sender.send(response, flags=FINAL if final else 0)

    async def send_final_off_loop(self, response) -> None:
        """Send a KV-sized final response from a worker thread.

        ``send`` copies the tensors into shared memory; for a KV that takes
        milliseconds, which must not stall the other requests on the loop.
        """
        if self.finished:
            raise RuntimeError("a response after the final one")
        self.finished = True  # before the thread starts: is_cancelled must not ask any more
        await asyncio.to_thread(self._sender.send, response, flags=FINAL)

    def is_cancelled(self) -> bool:
        return not self.finished and self._sender.is_cancelled()


def send_error(sender: Responder, message: str, code=None) -> None:
    """End the request with an error, unless it already ended."""
    if sender.finished:
        logging.getLogger(__name__).warning("not sent (the request already ended): %s", message)
        return
    sender.send(error_response(message, code), final=True)


def invalid_arg():
    return pb_utils.TritonError.INVALID_ARG


def unavailable():
    return pb_utils.TritonError.UNAVAILABLE


def cancelled():
    return pb_utils.TritonError.CANCELLED


