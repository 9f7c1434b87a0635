"""What the llm and prefill models share: a vLLM engine serving Triton requests.

``execute`` hands each request to the engine loop and returns (as Triton's
vLLM backend does). Every request ends with exactly one response flagged
final, errors included, within ``request_timeout_s`` (config.pbtxt). Admission
control bounds the requests in flight (``max_requests_in_flight``); beyond it
requests queue (``max_queued_requests``, each at most ``queue_timeout_s``),
then get an "overloaded" error (UNAVAILABLE). A watcher polls every request in flight for its
client's cancellation (``response_sender.is_cancelled``) and, where the model
reads one, the server's CancelBoard (how ``llm`` cancels a BLS request to
prefill: Triton 2.51 cannot), and aborts it in the engine.
"""

from __future__ import annotations

import asyncio
import gc
import sys
import time
import json
import logging
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from vllm.exceptions import VLLMClientError
from vllm.v1.engine.exceptions import EngineDeadError

from hetserve import names
from hetserve.admission import Admission, Overloaded
from hetserve.cancel import CancelBoard, check_request_id
from hetserve.engine import EngineLoop, eager_cpu_env, engine_env, load_engine_args, with_connector
from hetserve.kv.format import TRITON_DTYPES
from hetserve.kv.slots import SlotPool
from hetserve.triton.common import Responder, cancelled, input_str, invalid_arg, send_error, unavailable

logger = logging.getLogger(__name__)

CANCEL_POLL_S = 0.05


class RequestFailed(Exception):
    """End the request with this message and Triton error code."""

    def __init__(self, message: str, code=None):
        super().__init__(message)
        self.code = code


def cancellation() -> RequestFailed:
    return RequestFailed("Request was cancelled", cancelled())


@dataclass(slots=True, eq=False)
class Flow:
    """One request in flight, as the cancellation watcher sees it."""

    request_id: str
    sender: Responder
    cancelled: bool = False
    in_engine: bool = False  # the engine holds it: a cancel aborts it there
    prefilling: bool = False  # and prefill too (llm's early load): a cancel goes to both
    aborted: bool = False
    attempts: list[str] = field(default_factory=list)  # ids of its calls to prefill tiers, the last in flight
    arrival: float = field(default_factory=time.monotonic)


class EngineModel:
    """Base of LLMModel and PrefillModel; subclasses implement ``handle``."""

    kv_role: str = ""
    name: str = ""
    reads_cancel_board: bool = False
    # config.pbtxt parameters that bound every request, and their defaults
    limits = {
        "request_timeout_s": "600",
        "max_requests_in_flight": "1024",
        "max_queued_requests": "1024",
        "queue_timeout_s": "30",
    }

    def __init__(self, args: dict[str, str]):
        model_json = Path(args["model_repository"]) / args["model_version"] / "model.json"
        self.config = json.loads(args["model_config"])
        engine_args = with_connector(load_engine_args(model_json), self.kv_role, self.parameter("kv_save", "all"))
        import vllm
        from vllm.platforms import current_platform

        env = eager_cpu_env(engine_args, engine_env(self.parameter("engine_env", "{}")), current_platform.is_cpu())
        os.environ.update(env)  # this stub runs one model instance: its engine processes inherit it

        if env:
            logger.info("%s: engine environment %s", self.name, env)

        logger.info("%s: Python environment %s (vllm %s)", self.name, sys.prefix, vllm.__version__)
        logger.info("%s: starting vLLM with %s", self.name, engine_args)
        self.engine = EngineLoop(engine_args, name=f"hetserve-{self.name}")
        self.fingerprint = self.engine.fingerprint
        self.max_model_len = self.engine.max_model_len
        self._check_kv_type()
        self.request_timeout_s = float(self.limit("request_timeout_s"))
        self.admission = Admission(
            self.name,
            max_requests=int(self.limit("max_requests_in_flight")),
            max_queued=int(self.limit("max_queued_requests")),
            queue_timeout_s=float(self.limit("queue_timeout_s")),
        )
        self.slots = SlotPool(self.name)
        self._active: dict[str, Flow] = {}  # engine loop only
        self.board = CancelBoard()
        self._watcher = self.engine.submit(self._watch_cancellations())
        self._watcher.add_done_callback(self._watcher_ended)
        logger.info("%s: ready; KV fingerprint %s", self.name, self.fingerprint.to_json())

    def parameter(self, key: str, default: str) -> str:
        """A ``parameters`` entry of config.pbtxt."""
        return self.config.get("parameters", {}).get(key, {}).get("string_value", default)

    def limit(self, key: str) -> str:
        return self.parameter(key, self.limits[key])

    def _check_kv_type(self) -> None:
        tensors = [*self.config.get("input", []), *self.config.get("output", [])]
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
        watcher, self._watcher = self._watcher, None  # None first: its stopping is expected now
        watcher.cancel()
        self.engine.shutdown()
        self.slots.close()
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
        if self.reads_cancel_board and request_id in self.board.cancelled():  # cancelled before it got here
            send_error(sender, "Request was cancelled", cancelled())
            return
        flow = self._active[request_id] = Flow(request_id, sender)
        ticket = None
        deadline = time.monotonic() + self.request_timeout_s
        try:
            ticket = await self.admission.enter()
            await asyncio.wait_for(self.handle(request, flow), deadline - time.monotonic())
        except Overloaded as exc:
            self.refused("overloaded")
            send_error(sender, str(exc), unavailable())
        except asyncio.TimeoutError:
            if time.monotonic() < deadline:  # not this request's deadline
                logger.exception("%s: request %s failed", self.name, request_id)
                send_error(sender, f"{self.name}: a wait timed out")
                return
            self.refused("timed_out")
            if not flow.cancelled:
                flow.cancelled = True
                await self.on_cancelled(flow, "it timed out")
            if not sender.finished:
                send_error(
                    sender, f"{self.name}: request {request_id} timed out after {self.request_timeout_s:g} s "
                    "(request_timeout_s)", unavailable(),
                )
        except RequestFailed as exc:
            send_error(sender, str(exc), exc.code)
        except EngineDeadError as exc:  # the launcher's Supervisor loads the model again
            send_error(sender, f"{self.name}: its vLLM engine died ({exc}); the model is being loaded again", unavailable())
        except (ValueError, VLLMClientError) as exc:  # the request was bad: say what
            send_error(sender, f"{self.name}: {exc}", invalid_arg())
        except Exception as exc:  # noqa: BLE001 - every request gets an answer
            logger.exception("%s: request %s failed", self.name, request_id)
            send_error(sender, f"{self.name}: {type(exc).__name__}: {exc}")
        finally:
            self._active.pop(request_id, None)
            if ticket is not None:
                self.admission.release(ticket)

    async def handle(self, request, flow: Flow) -> None:
        raise NotImplementedError

    def refused(self, reason: str) -> None:
        """A request ended by a limit (``overloaded``, ``timed_out``): for metrics."""

    async def abort(self, flow: Flow, why: str) -> None:
        """Abort ``flow`` in the engine, once."""
        if flow.aborted:
            return
        flow.aborted = True
        logger.info("%s: aborted request %s (%s)", self.name, flow.request_id, why)
        await self.engine.engine.abort(flow.request_id)

    async def on_cancelled(self, flow: Flow, why: str) -> None:
        if flow.in_engine:
            await self.abort(flow, why)

    def _watcher_ended(self, future) -> None:
        """Say so if the cancellation watcher ever stops before finalize: no cancel is noticed after it."""
        if self._watcher is None:  # finalize cancelled it
            return
        exc = None if future.cancelled() else future.exception()
        logger.error("%s: the cancellation watcher stopped (%r); client cancellations go unnoticed now", self.name, exc)

    async def _watch_cancellations(self) -> None:
        # The sleeping frame must hold no response sender: destroying one after
        # the stub's shared memory is gone (at interpreter exit, through the
        # cancelled task's traceback) segfaults the stub.
        # One failed round must not end the watching: every later cancellation
        # would then go unnoticed for the model's lifetime.
        while True:
            await asyncio.sleep(CANCEL_POLL_S)
            try:
                await self._cancel_marked()
            except Exception:  # noqa: BLE001 - log it and keep watching
                logger.exception("%s: a round of cancellation checks failed", self.name)

    async def _cancel_marked(self) -> None:
        # Decide for all first, with no await in between: a request that
        # finishes meanwhile must not be asked (see Responder).
        marked = self.board.cancelled() if self.reads_cancel_board and self._active else set()
        found = []
        for flow in self._active.values():
            try:
                if flow.cancelled:
                    continue
                if flow.request_id in marked:
                    found.append((flow, "marked cancelled"))
                elif flow.sender.is_cancelled():
                    found.append((flow, "its client cancelled"))
            except Exception:  # noqa: BLE001 - keep watching the others
                logger.exception("%s: cancellation check failed for %s", self.name, flow.request_id)
        for flow, why in found:
            flow.cancelled = True
            await self.on_cancelled(flow, why)
