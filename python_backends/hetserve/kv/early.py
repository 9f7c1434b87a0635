"""Early loads: the decode engine holds a request while prefill still writes its KV.

``llm`` adds its decode request to its engine when it asks ``prefill`` for
the prompt, not after prefill has answered. The connector tells vLLM the
request's KV arrives asynchronously (``get_num_new_matched_tokens`` returns
``load_kv_async``): vLLM allocates its blocks, parks it in
``WAITING_FOR_REMOTE_KVS`` and goes on with its other requests. At every step
the worker looks at each parked request's slot (:meth:`EarlyLoads.advance`):
once prefill's worker has stamped it, the worker scatters the KV into the
request's blocks, in that step, on its own threads; once ``llm`` has written
prefill's first token into the slot's header, the load is done
(``get_transfer_results``), the token is left for ``ForceFirstToken``
(first_token.py), and vLLM schedules the request. So the hand-off from gather
to scatter no longer waits for prefill's engine to finish its step, the BLS
reply, llm's loop and the decode engine to take a new request. A layer-wise
writer (prefill's ``kv_save`` "layer", CPU pages) publishes the layers it has
finished before its stamp (the header's NUM_TOKENS, then LAYERS_WRITTEN); the
worker scatters those at each step while prefill computes the rest, and the
remainder once the slot is stamped.

An engine with nothing but parked requests steps anyway, 1 ms apart; each
such step costs two processes CPU that the prefill being waited for needs.
The scheduler side (:func:`movable`) therefore holds an idle step back, up
to ``IDLE_WAIT_S`` (kv/connector.py, 20 ms), until a parked request's slot has
something for the worker to do (stamped; a quarter of the model's layers, at
most 8, published and not yet read; the first token written; abandoned) or a
new request or an abort reaches the engine (:func:`hold_idle`).

A load ends failed, never raising into vLLM, when the slot does not hold the
request's KV, when ``llm`` abandons the lending (prefill failed or the
request finished early: the header's ABANDONED), when vLLM finished the
request (aborted), or after ``early_wait_s``. vLLM frees a parked request's
blocks only once its load is reported ended, so the worker never writes into
blocks another request owns.
"""

from __future__ import annotations

import logging
import queue
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable

from hetserve.kv.slots import Field, SlotError, first_token, header, now_ns, written_layers, written_tokens

if TYPE_CHECKING:
    import torch

    from hetserve.kv.connector import TransferSpec

logger = logging.getLogger(__name__)

# (slot path, nonce) -> the first token llm wrote for it; ForceFirstToken takes it (the worker's process).
FIRST_TOKENS: dict[tuple[str, int], int] = {}


def layers_per_idle_step(num_layers: int) -> int:
    """How many published layers let an idle engine's step go: a quarter of the model's, 1 to 8."""
    return max(1, min(8, num_layers // 4))


def movable(head: "torch.Tensor", nonce: int, num_tokens: int, layers_per_step: int) -> bool:
    """Whether a parked request's slot (its ``head``er) lets the worker move its load on now."""
    if int(head[Field.ABANDONED]):
        return True
    if not int(head[Field.SCATTER_END_NS]):
        if written_tokens(head, nonce) is not None:  # stamped, not yet scattered
            return True
        return written_layers(head, num_tokens) - int(head[Field.LAYERS_READ]) >= layers_per_step
    return first_token(head) is not None


def hold_idle(headers: Callable[[], Iterable[tuple["torch.Tensor", int, int]]], inputs: "queue.Queue | None",
              layers_per_step: int, wait_s: float, poll_s: float) -> None:
    """Hold back an engine step that has nothing to compute but parked requests.

    Returns once a parked slot is :func:`movable` (``headers()``: each parked
    request's slot header, nonce and token count), the engine's ``inputs``
    queue holds something (a new request, an abort: the next step should see
    it), or after ``wait_s``; looks every ``poll_s``. A slot that cannot be
    read ends the wait (the worker fails its request).
    """
    deadline = time.monotonic() + wait_s
    while True:
        try:
            if any(movable(head, nonce, tokens, layers_per_step) for head, nonce, tokens in headers()):
                return
        except SlotError:
            return
        if (inputs is not None and not inputs.empty()) or time.monotonic() >= deadline:
            return
        time.sleep(poll_s)


def engine_inputs() -> "queue.Queue | None":
    """The input queue of the vLLM EngineCore whose scheduler is calling, found up the call stack; None if not.

    vLLM gives a KV connector no handle on its engine; the EngineCore's busy
    loop (``run_busy_loop`` -> ``step`` -> the scheduler -> the connector) holds
    its ``input_queue``, where new requests and aborts wait for the next step.
    """
    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        inputs = getattr(owner, "input_queue", None)
        if isinstance(inputs, queue.Queue):
            logger.info("early loads: an idle step waits for a parked slot or the %s's next input", type(owner).__name__)
            return inputs
        frame = frame.f_back
    logger.info("no vLLM EngineCore input queue up the stack: an idle step with parked requests waits its full bound")
    return None


class _GaveUp(Exception):
    """A load that ends without the KV, through nobody's fault (abandoned, aborted)."""


@dataclass(slots=True)
class _Pending:
    spec: "TransferSpec"
    deadline: float
    layers: int = 0  # leading layers scattered (a layer-wise writer's, before its stamp)
    copy_ns: int = 0  # time spent scattering them
    scattered: bool = False


class EarlyLoads:
    """The worker's parked loads.

    ``scatter(spec, start, stop)`` copies layers ``start:stop`` (``stop`` None:
    to the last) of a slot's KV into the spec's blocks; ``mapping(path,
    nbytes)`` maps a slot.
    """

    def __init__(
        self, scatter: Callable[["TransferSpec", int, int | None], None], mapping: Callable[[str, int], "torch.Tensor"],
    ):
        self._scatter = scatter
        self._mapping = mapping
        self._pending: dict[str, _Pending] = {}
        # loaded: request -> its FIRST_TOKENS key, until the step that computes the prompt's last token
        self._ok: dict[str, tuple[str, int]] = {}

    def add(self, spec: "TransferSpec") -> None:
        self._pending[spec.req_id] = _Pending(spec, time.monotonic() + (spec.wait_s or 0.0))

    def advance(self, aborted: set[str]) -> tuple[set[str], set[str]]:
        """Move every parked load on as far as its slot allows: the loads that ended (all, failed)."""
        for req_id in aborted:
            key = self._ok.pop(req_id, None)  # finished before its first step
            if key is not None:
                FIRST_TOKENS.pop(key, None)
        finished, failed = set(), set()
        for req_id, pending in list(self._pending.items()):
            try:
                if req_id in aborted:
                    raise _GaveUp("aborted")
                if not self._move(pending):
                    continue
            except _GaveUp as why:
                logger.info("early KV load for request %s: %s", req_id, why)
                failed.add(req_id)
            except Exception as exc:  # noqa: BLE001 - fail the request, not the engine
                logger.warning("early KV load for request %s failed: %s", req_id, exc)
                failed.add(req_id)
            del self._pending[req_id]
            finished.add(req_id)
        return finished, failed

    def loaded(self, req_id: str) -> bool:
        """Whether ``req_id``'s KV was loaded (asked once, by the step that computes its last prompt token)."""
        return self._ok.pop(req_id, None) is not None

    def _move(self, pending: _Pending) -> bool:
        """Whether the load is done (its first token kept); raises if it cannot be."""
        spec = pending.spec
        head = header(self._mapping(spec.path, spec.capacity))
        if int(head[Field.ABANDONED]):
            raise _GaveUp("abandoned by its caller")
        if not pending.scattered:
            written = written_tokens(head, spec.nonce)
            if written is None:  # not stamped: the layers a layer-wise writer finished, if any
                ready = written_layers(head, spec.num_tokens)
                if ready > pending.layers:
                    self._copy(pending, ready)
                    head[Field.LAYERS_READ] = ready
                return self._in_time(pending)
            if written < spec.num_tokens:
                raise SlotError(f"slot {spec.path} holds {written} tokens, expected {spec.num_tokens}")
            end = self._copy(pending, None)
            # Like a layer-wise gather's: the copying, ending now (earlier layers were read while prefill computed).
            head[Field.SCATTER_START_NS] = end - pending.copy_ns
            head[Field.SCATTER_END_NS] = end
            pending.scattered = True
        token = first_token(head)
        if token is None:
            return self._in_time(pending)
        key = (spec.path, spec.nonce)
        FIRST_TOKENS[key] = token
        self._ok[spec.req_id] = key
        return True

    def _copy(self, pending: _Pending, stop: int | None) -> int:
        """Scatter the layers from ``pending.layers`` to ``stop``; the time it ended (ns)."""
        start = now_ns()
        self._scatter(pending.spec, pending.layers, stop)
        end = now_ns()
        pending.copy_ns += end - start
        if stop is not None:
            pending.layers = stop
        return end

    @staticmethod
    def _in_time(pending: _Pending) -> bool:
        if time.monotonic() > pending.deadline:
            raise SlotError(f"slot {pending.spec.path} was not complete within {pending.spec.wait_s:g} s")
        return False
