"""What the prefill and decode models share: a vLLM engine serving Triton requests.

``execute`` hands each request to the engine loop and returns. Every request
ends with exactly one response flagged final, errors included. A request is
aborted in the engine when its client cancels (``response_sender.is_cancelled``)
or when its id is marked on the server's CancelBoard (how the ``llm`` BLS model
cancels), both polled.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import uuid
from pathlib import Path

from vllm.exceptions import VLLMClientError

from hetserve import names
from hetserve.engine import EngineLoop, load_engine_args, with_connector
from hetserve.cancel import CancelBoard, check_request_id
from hetserve.kv.buffers import BufferPool
from hetserve.kv.format import TRITON_DTYPES
from hetserve.triton.common import Responder, cancelled, input_str, invalid_arg, send_error

logger = logging.getLogger(__name__)

CANCEL_POLL_S = 0.05


class EngineModel:
    """Base of PrefillModel and DecodeModel; subclasses implement ``handle``."""

    kv_role: str = ""
    name: str = ""

    def __init__(self, args: dict[str, str]):
        model_json = Path(args["model_repository"]) / args["model_version"] / "model.json"
        engine_args = with_connector(load_engine_args(model_json), self.kv_role)
        logger.info("%s: starting vLLM with %s", self.name, engine_args)
        self.engine = EngineLoop(engine_args, name=f"hetserve-{self.name}")
        self.fingerprint = self.engine.fingerprint
        self.max_model_len = self.engine.max_model_len
        self._check_kv_type(json.loads(args["model_config"]))
        # One buffer holds the largest KV this model accepts.
        self.pool = BufferPool(self.name, self.fingerprint.bytes_per_token * self.max_model_len)
        # engine request id -> response sender, None once aborted (loop thread only)
        self._active: dict[str, object | None] = {}
        self._board = CancelBoard()
        self._watcher = self.engine.submit(self._watch_cancellations())
        logger.info("%s: ready; KV fingerprint %s", self.name, self.fingerprint.to_json())

    def _check_kv_type(self, config: dict) -> None:
        tensors = [*config.get("input", []), *config.get("output", [])]
        declared = {t["name"]: t["data_type"] for t in tensors}.get(names.KV_CACHE)
        wanted = "TYPE_" + TRITON_DTYPES[self.fingerprint.torch_dtype]
        if declared != wanted:
            self.engine.shutdown()
            raise ValueError(
                f"{self.name}: config.pbtxt declares {names.KV_CACHE} as {declared}, but the engine's KV is "
                f"{self.fingerprint.dtype} ({wanted}); `hetserve serve` writes the right type"
            )

    # Called on the stub's main thread.
    def execute(self, requests) -> None:
        for request in requests:
            self.engine.submit(self._dispatch(request))

    def finalize(self) -> None:
        self._watcher.cancel()
        self.engine.shutdown()
        self.pool.close()
        self._watcher = None
        gc.collect()  # release Triton objects while the stub can still free them

    # Everything below runs on the engine loop.
    async def _dispatch(self, request) -> None:
        sender = Responder(request)
        try:
            request_id = check_request_id(input_str(request, names.REQUEST_ID) or uuid.uuid4().hex)
            if request_id in self._active:
                raise ValueError(f"request_id {request_id!r} is already in flight")
        except ValueError as exc:
            send_error(sender, str(exc), invalid_arg())
            return
        if request_id in self._board.cancelled():  # cancelled before it got here
            send_error(sender, "Request was cancelled", cancelled())
            return
        self._active[request_id] = sender
        try:
            await self.handle(request, sender, request_id)
        except (ValueError, VLLMClientError) as exc:  # the request was bad: say what
            send_error(sender, f"{self.name}: {exc}", invalid_arg())
        except Exception as exc:  # noqa: BLE001 - every request gets an answer
            logger.exception("%s: request %s failed", self.name, request_id)
            send_error(sender, f"{self.name}: {type(exc).__name__}: {exc}")
        finally:
            self._active.pop(request_id, None)

    async def handle(self, request, sender, request_id: str) -> None:
        raise NotImplementedError

    async def _abort(self, request_id: str, why: str) -> None:
        self._active[request_id] = None  # abort once
        logger.info("%s: aborted request %s (%s)", self.name, request_id, why)
        await self.engine.engine.abort(request_id)

    async def _watch_cancellations(self) -> None:
        # The sleeping frame must hold no response sender: destroying one after
        # the stub's shared memory is gone (at interpreter exit, through the
        # cancelled task's traceback) segfaults the stub.
        while True:
            await asyncio.sleep(CANCEL_POLL_S)
            await self._abort_cancelled()

    async def _abort_cancelled(self) -> None:
        # Decide for all first, with no await in between: a request that
        # finishes meanwhile must not be asked (see Responder).
        marked = self._board.cancelled() if self._active else set()
        to_abort = []
        for request_id, sender in self._active.items():
            try:
                if sender is None:
                    continue
                if request_id in marked:
                    to_abort.append((request_id, "marked cancelled"))
                elif sender.is_cancelled():
                    to_abort.append((request_id, "its client cancelled"))
            except Exception:  # noqa: BLE001 - keep watching the others
                logger.exception("%s: cancellation check failed for %s", self.name, request_id)
        for request_id, why in to_abort:
            if self._active.get(request_id) is not None:
                await self._abort(request_id, why)
