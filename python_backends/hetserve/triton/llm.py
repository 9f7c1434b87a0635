"""The ``llm`` BLS model: prefill, then decode, streamed back to the client.

It imports neither torch nor vLLM. The KV travels as the prefill response's
output tensors, which live in this stub's shared memory, straight into the
decode request's inputs (no copy here).

Triton 2.51's BLS response iterator blocks on ``next``; it is driven from a
thread pool so that one slow stream never stalls the others on the stub's
event loop. A BLS request cannot be cancelled in 2.51, so a client's cancel is
marked on the server's CancelBoard, which prefill and decode poll; the model
holding the request aborts it and answers with a cancellation error.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import triton_python_backend_utils as pb_utils

from hetserve import names
from hetserve.cancel import CancelBoard
from hetserve.triton.common import (
    Responder,
    cancelled,
    ids_tensor,
    input_tensor,
    invalid_arg,
    send_error,
    string_tensor,
)
from hetserve.triton.llm_request import LLMRequest, parse

logger = logging.getLogger(__name__)

CANCEL_POLL_S = 0.05
_PREFILL_OUTPUTS = [spec.name for spec in names.IO[names.Model.PREFILL]["outputs"]]
_DECODE_OUTPUTS = [spec.name for spec in names.IO[names.Model.DECODE]["outputs"]]


class RequestFailed(Exception):
    def __init__(self, message: str, code=None):
        super().__init__(message)
        self.code = code


@dataclass(slots=True)
class _Flow:
    """One client request's progress, shared with its cancellation watcher."""

    request_id: str
    holder: str = names.Model.PREFILL.value
    cancelled: bool = False
    done: bool = False
    text: list[str] = field(default_factory=list)  # non-streamed: kept for the final response
    ids: list[int] = field(default_factory=list)


def _output(response, name: str):
    return pb_utils.get_output_tensor_by_name(response, name)


def _output_str(response, name: str) -> str:
    value = _output(response, name).as_numpy().reshape(-1)[0]
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class LLMModel:
    def __init__(self, args: dict[str, str]):
        self._board = CancelBoard()
        self._threads = ThreadPoolExecutor(max_workers=512, thread_name_prefix="hetserve-bls")
        self._loop_ready = False

    async def execute(self, requests) -> None:
        if not self._loop_ready:  # async_exec waits in the loop's default executor
            asyncio.get_running_loop().set_default_executor(self._threads)
            self._loop_ready = True
        await asyncio.gather(*(self._serve(request) for request in requests))

    def finalize(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)
        gc.collect()  # free response senders while the stub can still release them

    async def _serve(self, request) -> None:
        sender = Responder(request)
        try:
            req = parse(request)
        except ValueError as exc:
            send_error(sender, str(exc), invalid_arg())
            return
        flow = _Flow(uuid.uuid4().hex)
        watcher = asyncio.create_task(self._watch(sender, flow))
        try:
            await self._generate(request, req, sender, flow)
        except RequestFailed as exc:
            send_error(sender, str(exc), exc.code)
        except Exception as exc:  # noqa: BLE001 - every request gets an answer
            logger.exception("llm: request %s failed", flow.request_id)
            send_error(sender, f"llm: {type(exc).__name__}: {exc}")
        finally:
            flow.done = True
            watcher.cancel()
            self._board.clear(flow.request_id)

    async def _generate(self, request, req: LLMRequest, sender, flow: _Flow) -> None:
        inputs = [
            input_tensor(request, names.TEXT_INPUT),
            string_tensor(names.SAMPLING_PARAMETERS, req.sampling_parameters),
            string_tensor(names.REQUEST_ID, flow.request_id),
        ]
        prefill = await self._responses(names.Model.PREFILL, inputs, _PREFILL_OUTPUTS)
        first = None
        while (response := await self._next(prefill)) is not None:
            first = self._check(response) or first
        if first is None:
            raise RequestFailed("prefill returned no output")
        num_input = _output(first, names.KV_TOKEN_IDS).as_numpy().size
        first_ids = _output(first, names.OUTPUT_IDS).as_numpy().reshape(-1).tolist()
        finish = _output_str(first, names.FINISH_REASON)
        self._emit(req, sender, flow, first_ids, _output_str(first, names.TEXT_OUTPUT), finish, num_input)
        if finish:
            return
        if flow.cancelled:
            raise RequestFailed("Request was cancelled", cancelled())
        flow.holder = names.Model.DECODE.value
        inputs = [
            _output(first, names.KV_CACHE),
            _output(first, names.KV_TOKEN_IDS),
            _output(first, names.KV_FINGERPRINT),
            ids_tensor(names.INPUT_IDS, first_ids),
            string_tensor(names.SAMPLING_PARAMETERS, _output_str(first, names.DECODE_PARAMETERS)),
            string_tensor(names.REQUEST_ID, flow.request_id),
        ]
        decode = await self._responses(names.Model.DECODE, inputs, _DECODE_OUTPUTS)
        finish = ""
        while (response := await self._next(decode)) is not None:
            if self._check(response) is None:
                continue
            finish = _output_str(response, names.FINISH_REASON)
            if finish == "abort":
                raise RequestFailed("Request was cancelled", cancelled())
            if finish == "error":
                raise RequestFailed(_output_str(response, names.TEXT_OUTPUT))
            ids = _output(response, names.OUTPUT_IDS).as_numpy().reshape(-1).tolist()
            self._emit(req, sender, flow, ids, _output_str(response, names.TEXT_OUTPUT), finish, num_input)
        if not finish:
            raise RequestFailed("decode ended without a finish reason")

    def _emit(self, req: LLMRequest, sender, flow: _Flow, ids: list[int], text: str, finish: str, num_input: int):
        """Stream a delta, or keep it until the final response."""
        if req.stream:
            sender.send(self._response(req, ids, text, finish, num_input), final=bool(finish))
            return
        flow.ids.extend(ids)
        flow.text.append(text)
        if finish:
            full = "".join(flow.text)
            if req.prepend_input:
                full = req.text + full
            sender.send(self._response(req, flow.ids, full, finish, num_input), final=True)

    @staticmethod
    def _response(req: LLMRequest, ids: list[int], text: str, finish: str, num_input: int):
        tensors = [string_tensor(names.TEXT_OUTPUT, text), ids_tensor(names.OUTPUT_IDS, ids)]
        if req.return_finish_reason:
            tensors.append(string_tensor(names.FINISH_REASON, finish or "None"))
        if req.return_num_input_tokens:
            tensors.append(pb_utils.Tensor(names.NUM_INPUT_TOKENS, np.array([num_input], dtype=np.uint32)))
        if req.return_num_output_tokens:
            tensors.append(pb_utils.Tensor(names.NUM_OUTPUT_TOKENS, np.array([len(ids)], dtype=np.uint32)))
        return pb_utils.InferenceResponse(output_tensors=tensors)

    @staticmethod
    def _check(response):
        """The response if it carries outputs, None for an empty final; raise on error."""
        if response.has_error():
            error = response.error()
            code = error.code() if hasattr(error, "code") else None
            raise RequestFailed(error.message(), code)
        return response if response.output_tensors() else None

    async def _responses(self, model: names.Model, inputs, outputs):
        request = pb_utils.InferenceRequest(
            model_name=model.value, inputs=inputs, requested_output_names=outputs
        )
        return await request.async_exec(decoupled=True)

    async def _next(self, responses):
        return await asyncio.get_running_loop().run_in_executor(self._threads, next, responses, None)

    async def _watch(self, sender, flow: _Flow) -> None:
        """Pass a client's cancellation on to the model that holds the request."""
        while not flow.done:
            await asyncio.sleep(CANCEL_POLL_S)
            if sender.is_cancelled():
                flow.cancelled = True
                self._board.cancel(flow.request_id)
                logger.info("llm: client cancelled request %s; cancelling it in %s", flow.request_id, flow.holder)
                return
