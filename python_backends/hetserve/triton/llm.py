"""The ``llm`` model: the decode tier, speaking Triton's vLLM backend interface.

It hosts the decode engine (vLLM with HetserveConnector as KV consumer) and
streams that engine's tokens straight to the client: one Python hop per token,
as in Triton's vLLM backend. Where the prompt is prefilled is decided per
request:

* a prompt shorter than ``remote_prefill_min_tokens`` (config.pbtxt parameter)
  is prefilled by this engine: no transfer;
* a longer one is prefilled by the ``prefill`` model (a BLS request): on the
  same host (``kv_transport: shm``) llm lends it a slot of its own, prefill's
  vLLM worker writes the KV into it and llm's worker reads it into the paged
  cache — two copies, no KV byte through a stub or the server. With
  ``kv_load: early`` (the default) llm adds the request to its engine as it
  calls prefill, and its worker loads the KV the moment prefill's worker has
  written it (kv/early.py), while prefill's reply is still on its way; with
  ``kv_load: after`` it adds the request after prefill's reply; with
  ``kv_transport: tensor`` the KV comes back as the interchange tensor and
  this stub copies it into a slot (off the event loop);
* a prefill tier on another Triton server (``grpc://HOST:PORT/MODEL`` in
  ``prefill_model``) is called over gRPC and returns the interchange tensor,
  which this stub copies into a slot; cancelling the gRPC call cancels it there;
* a client may send the KV itself (``kv_cache``, ``kv_token_ids``,
  ``kv_fingerprint``, ``input_ids``): checked, copied into a slot, loaded.

If the prefill model fails (not the request's own fault), is not ready, does
not answer within ``prefill_timeout_s``, or has more KV hand-offs in flight
than its admission allows (``prefill_max_requests``, ``prefill_max_kv_bytes``,
queueing at most ``prefill_max_queued`` for ``prefill_queue_timeout_s``), llm
prefills locally: the client sees a slower first token, not an error. Prefill's first token is
the client's first token; the engine then continues from the loaded KV.
Cancellation: a request in this engine is aborted here; one still in prefill
is marked on the CancelBoard, which prefill polls (a BLS request cannot be
cancelled in Triton 2.51).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import Enum
from typing import AsyncIterator, Callable

import numpy as np
import torch
import triton_python_backend_utils as pb_utils
from vllm import SamplingParams
from vllm.inputs import TokensPrompt
from vllm.sampling_params import RequestOutputKind

from hetserve import names
from hetserve.admission import Admission, Overloaded, Ticket
from hetserve.cancel import attempt_id
from hetserve.routing import Tier, eligible, order, parse_tiers
from hetserve.connector_params import load_params
from hetserve.daemon_pool import DaemonPool
from hetserve.kv import transfer
from hetserve.kv.format import KVMismatchError, ModelFingerprint, validate_kv
from hetserve.first_token import FIRST_TOKEN_KEY
from hetserve.kv.slots import Field, Slot, now_ns
from hetserve.logprobs import entries, logprob_of
from hetserve.sampling import parse_json, to_sampling_params
from hetserve.streaming import StreamInterval, hold_in_engine
from hetserve.text import Continuation, engine_params
from hetserve.triton.common import cancelled, ids_tensor, invalid_arg, string_tensor
from hetserve.triton.engine_model import EngineModel, Flow, RequestFailed, cancellation
from hetserve.triton.llm_request import LLMRequest, client_kv, parse
from hetserve.triton.metrics import KVMetrics, MetricWriter, ServingMetrics

logger = logging.getLogger(__name__)

ABORT, ERROR, STOP, LENGTH = "abort", "error", "stop", "length"
PREFILL_READY_POLL_S = 0.5
REMOTE_READY_TIMEOUT_S = 2.0
_PREFILL_OUTPUTS = [spec.name for spec in names.IO[names.Model.PREFILL]["outputs"]]


class Transport(str, Enum):
    SHM = "shm"  # a slot lent to prefill on this host
    TENSOR = "tensor"  # the interchange tensor through Triton
    CLIENT = "client"  # KV the client sent
    GRPC = "grpc"  # the interchange tensor from a prefill tier on another server


class PrefillUnavailable(Exception):
    """The prefill tier failed a request through no fault of the request."""


class PrefillTimeout(PrefillUnavailable):
    """The prefill tier did not answer in ``prefill_timeout_s`` (it may hang while reading ready)."""


class _Reply:
    """Prefill's one response, from this server (BLS) or another (gRPC), as numpy and torch."""

    def __init__(self, array: Callable[[str], np.ndarray], kv: Callable[[], torch.Tensor]):
        self.array, self.kv = array, kv

    def text(self, name: str) -> str:
        value = self.array(name).reshape(-1)[0]
        return value.decode("utf-8") if isinstance(value, bytes) else str(value)

    @classmethod
    def of_bls(cls, response) -> "_Reply":
        return cls(
            lambda name: _output(response, name).as_numpy(),
            lambda: torch.from_dlpack(_output(response, names.KV_CACHE).to_dlpack()),
        )

    @classmethod
    def of_grpc(cls, result) -> "_Reply":
        def array(name: str) -> np.ndarray:
            value = result.as_numpy(name)
            if value is None:
                raise PrefillUnavailable(f"the prefill response has no {name}")
            return value

        def kv() -> torch.Tensor:
            value = array(names.KV_CACHE)
            if value.dtype.itemsize == 2 and value.dtype != np.float16:  # ml_dtypes.bfloat16: torch has no numpy bf16
                return torch.from_numpy(value.view(np.int16)).view(torch.bfloat16)
            return torch.from_numpy(value)

        return cls(array, kv)


@dataclass(slots=True)
class Handoff:
    """A slot of this model's that holds a prompt's KV, until the engine has read it."""

    slot: Slot
    num_tokens: int
    transport: Transport
    gather_ns: tuple[int, int] | None
    ticket: Ticket | None = None  # the prefill tier's admission, held until the KV is read
    wire_bytes: int | None = None  # bytes that crossed Triton or the network, when compressed
    transfer_dtype: str = transfer.AUTO  # how the slot holds the KV (the worker decodes it)
    tier: Tier | None = None
    loaded: bool = False


@dataclass(slots=True)
class _Sent:
    """What the client already got from prefill, to take off the engine's first output(s)."""

    ids: list[int]
    text: str

    def skip(self, ids: list[int], text: str) -> tuple[list[int], str, int]:
        """``ids`` and ``text`` without what was sent already, and how many ids that was."""
        if not self.ids and not self.text:
            return ids, text, 0
        n = min(len(self.ids), len(ids))
        if ids[:n] != self.ids[:n]:
            raise RequestFailed(f"llm: the engine's first token {ids[:n]} differs from prefill's {self.ids[:n]}")
        m = min(len(self.text), len(text))
        if text[:m] != self.text[:m]:
            raise RequestFailed("llm: the engine's first text differs from what was sent")
        self.ids, self.text = self.ids[n:], self.text[m:]
        return ids[n:], text[m:], n


@dataclass(slots=True)
class _Output:
    """What the client has been sent, and what is kept for its next response (all of it, not streaming)."""

    req: LLMRequest
    num_input: int
    n: int = 1
    arrival: float = field(default_factory=time.monotonic)
    first_at: float | None = None
    sent: int = 0  # tokens sent or kept
    ids: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    logprobs: list[dict] | None = None
    cumulative: float | None = None  # None without logprobs, as vLLM (sent as NaN, as Triton's vLLM backend)
    responses: int = 0  # streamed responses sent


class LLMModel(EngineModel):
    kv_role = "kv_consumer"
    name = "llm"

    def __init__(self, args: dict[str, str]):
        super().__init__(args)
        self.remote_min_tokens = int(self.parameter("remote_prefill_min_tokens", "32"))
        self.transport = Transport(self.parameter("kv_transport", Transport.SHM.value))
        kv_load = self.parameter("kv_load", "early")
        if kv_load not in ("early", "after"):
            raise ValueError(f"kv_load must be early or after, got {kv_load!r}")
        self.early_load = kv_load == "early"
        # What crosses Triton or the network (tensor transport, remote tiers); shm moves the model's dtype.
        self.transfer_dtype = transfer.check(self.parameter("kv_transfer_dtype", transfer.AUTO))
        self.metric_writer = MetricWriter(self.name)
        self.metrics = KVMetrics(self.name, self.metric_writer)
        self.serving = ServingMetrics(self.name, args["model_version"], self.metric_writer)
        self.admission.on_change = lambda running, queued: self.serving.tier(self.name, running, queued)
        self.prefill_timeout_s = float(self.parameter("prefill_timeout_s", "60"))
        self.streaming = StreamInterval.parse(self.parameter("stream_interval", "auto"))
        self.tiers = parse_tiers(
            self.parameter("prefill_model", names.Model.PREFILL.value), self.remote_min_tokens,
            lambda model: Admission(
                model,
                max_requests=int(self.parameter("prefill_max_requests", "64")),
                max_queued=int(self.parameter("prefill_max_queued", "64")),
                queue_timeout_s=float(self.parameter("prefill_queue_timeout_s", "2")),
                max_bytes=int(self.parameter("prefill_max_kv_bytes", str(1 << 30))),
            ),
        )
        # Copies into slots and readiness checks wait in the loop's default executor.
        self._threads = ThreadPoolExecutor(max_workers=16, thread_name_prefix="hetserve-llm")
        self._bls = DaemonPool("hetserve-bls")
        self.engine.loop.call_soon_threadsafe(self.engine.loop.set_default_executor, self._threads)
        for tier in self.tiers:
            tier.admission.on_change = lambda running, queued, name=tier.name: self.serving.tier(name, running, queued)
        if self.tiers:
            logger.info(
                "%s: prefill tiers %s (KV transport %s; over gRPC from another server; transfer dtype %s where "
                "the KV crosses Triton or gRPC); shorter prompts, and those no tier takes, are prefilled here", self.name,
                ", ".join(f"{t.name} from {t.min_tokens} tokens" for t in self.tiers), self.transport.value,
                self.transfer_dtype,
            )
        else:
            logger.info("%s: no prefill tier; every prompt is prefilled by this model's engine", self.name)

    def refused(self, reason: str) -> None:
        self.serving.refused(reason)

    def finalize(self) -> None:
        self.metric_writer.close()
        self.metrics.close()
        self.serving.close()
        for tier in self.tiers:
            if tier.client is not None:
                self.engine.submit(tier.client.close())
        super().finalize()
        self._threads.shutdown(wait=False, cancel_futures=True)

    async def on_cancelled(self, flow: Flow, why: str) -> None:
        if flow.in_engine:
            await self.abort(flow, why)
        if not flow.in_engine or flow.prefilling:  # in prefill, or about to be: prefill polls the board
            for attempt in flow.attempts[-1:]:
                self.board.cancel(attempt)
            logger.info("llm: client cancelled request %s; cancelling it in prefill", flow.request_id)

    async def handle(self, request, flow: Flow) -> None:
        req = parse(request)
        params = to_sampling_params(parse_json(req.sampling_parameters))
        try:
            sent = client_kv(request, self.fingerprint, self.max_model_len - 2, self.engine.check_prompt_ids)
            if sent is not None:
                await self._continue_client_kv(flow, req, params, sent)
                return
            if req.text is None:
                raise ValueError("text_input is missing")
            ids = self.engine.tokenize(req.text)
            out = _Output(req, len(ids), params.n, flow.arrival)
            # Prompt logprobs need every prompt position computed here: no transfer then.
            tiers = await self._route(len(ids)) if params.prompt_logprobs is None else []
            if tiers:  # a bad request is refused here, not sent to prefill
                self.engine.check_params(params)
            for i, tier in enumerate(tiers):
                early: _Early | None = None
                sent_at = time.monotonic()
                if i and not tier.usable(sent_at):  # the retry: the tier may have gone quiet since routing
                    continue
                probe = tier.trying(sent_at, self.prefill_timeout_s)

                def start_early(slot: Slot) -> None:  # the engine waits for the KV while prefill writes it
                    nonlocal early
                    early = self._start_early(flow, out, params, ids, slot)

                try:
                    first, finish, first_logprobs, handoff = await self._prefill(
                        tier, flow, req, ids, start_early if self._loads_early(tier) else None
                    )
                except BaseException as exc:
                    if isinstance(exc, PrefillTimeout):
                        if quiet := tier.timed_out(sent_at, time.monotonic()):
                            logger.warning("llm: %s gets no prompts for %g s (%d timeout(s) in a row)", tier.name, quiet, tier.timeouts)
                    elif probe:
                        tier.tried()
                    if early is not None:
                        await early.close()
                        flow.in_engine = flow.prefilling = False
                    if not isinstance(exc, PrefillUnavailable):
                        raise
                    then = f"trying {tiers[i + 1].name}" if i + 1 < len(tiers) else "prefilling it locally"
                    logger.warning("llm: %s; request %s: %s", exc, flow.request_id, then)
                    continue
                tier.answered()
                self.serving.prefilled(tier.name)
                try:
                    await self._continue(flow, out, params, ids, first, finish, first_logprobs, handoff, early)
                finally:
                    if early is not None:
                        await early.close()
                return
            self.serving.prefilled("local")
            await self._generate(flow, out, params, ids)
        finally:
            for attempt in flow.attempts:
                self.board.clear(attempt)

    def _loads_early(self, tier: Tier) -> bool:
        """Whether the engine takes a request to ``tier`` while prefill runs (kv/early.py)."""
        return self.early_load and tier.url is None and self.transport is Transport.SHM

    def _start_early(self, flow: Flow, out: "_Output", params: SamplingParams, ids: list[int], slot: Slot) -> "_Early":
        """Add the request to this engine now, its KV to be loaded from ``slot`` as soon as prefill wrote it."""
        engine = self._engine_params(out, params, load_params(slot.ref, len(ids), early_wait_s=self.prefill_timeout_s + 5))
        flow.in_engine = flow.prefilling = True
        return _Early(self.engine.engine.generate(TokensPrompt(prompt_token_ids=ids), engine, flow.request_id))

    async def _continue(
        self, flow, out, params, ids: list[int], first: list[int], finish: str, first_logprobs, handoff: Handoff,
        early: "_Early | None" = None,
    ):
        """Send prefill's token at once; unless it ends the generation, this engine goes on.

        The engine gets the prompt itself, KV loaded for all but its last token,
        and is made to pick prefill's token at its first step (first_token.py):
        so its sampler, penalties, grammar and detokenizer are in exactly the
        state of a single engine's. That first step's output is not sent again.
        ``early``: the engine has the request already (it waits for the first
        token in the slot's header).
        """
        flow.prefilling = False
        try:
            text = Continuation(self.engine.engine.get_tokenizer(), flow.request_id, ids, [], params)
            delta = text.update(first, finish == STOP, False)
            if delta.stop_string is not None:
                finish = STOP
            elif not finish and (params.max_tokens == 1 or len(ids) + 1 >= self.max_model_len):
                finish = LENGTH
            cumulative = None if first_logprobs is None else sum(logprob_of(e, t) for e, t in zip(first_logprobs, first))
            self._emit(flow, out, delta.token_ids, delta.text, finish, first_logprobs, cumulative)
            if finish:
                return
            if flow.cancelled:
                raise cancellation()
            sent = _Sent(list(first), delta.text)
            if early is not None:
                handoff.slot.give_first_token(first[0])
            await self._generate(flow, out, params, ids, handoff=handoff, sent=sent, outputs=early and early.stream())
        finally:
            if not handoff.loaded:  # the engine never started (or, early, may still read the slot)
                self._free(handoff, reuse=bool(finish) and early is None)

    async def _continue_client_kv(self, flow, req: LLMRequest, params: SamplingParams, sent) -> None:
        """Generate after KV a client sent: ``kv_token_ids`` + ``input_ids`` are the context."""
        out = _Output(req, len(sent.kv_ids), params.n, flow.arrival)
        self.serving.prefilled("client")
        # input_ids are tokens already generated: the engine must not treat them
        # as prompt text, so this model detokenizes (text.py).
        text = Continuation(self.engine.engine.get_tokenizer(), flow.request_id, sent.kv_ids, sent.new_ids, params)
        handoff = await self._to_slot(sent.kv, len(sent.kv_ids), Transport.CLIENT, None)
        await self._generate(flow, out, params, sent.kv_ids + sent.new_ids, handoff=handoff, text=text)

    async def _generate(
        self,
        flow: Flow,
        out: "_Output",
        params: SamplingParams,
        prompt: list[int],
        handoff: Handoff | None = None,
        sent: "_Sent | None" = None,
        text: Continuation | None = None,
        outputs: "AsyncIterator | None" = None,
    ) -> None:
        """Stream this engine's tokens for ``prompt``.

        ``handoff``: KV for the prompt's leading tokens, in a slot. ``sent``:
        the first token, already sent to the client (forced, then skipped).
        ``text``: detokenize here rather than in the engine. ``outputs``: the
        engine's outputs of a request added already (an early load).
        """
        if outputs is None:
            kv = None if handoff is None else load_params(handoff.slot.ref, handoff.num_tokens, handoff.transfer_dtype)
            engine = self._engine_params(out, params, kv, None if sent is None else sent.ids[0], text is not None)
            flow.in_engine = True
            if flow.cancelled:
                raise cancellation()
            outputs = self.engine.engine.generate(TokensPrompt(prompt_token_ids=prompt), engine, flow.request_id)
        elif flow.cancelled:
            raise cancellation()
        try:
            async for output in outputs:
                if handoff is not None and not handoff.loaded:
                    self._loaded(handoff)
                completion = output.outputs[0]
                if completion.finish_reason == ABORT or (flow.cancelled and not output.finished):
                    await self.abort(flow, "its client cancelled")
                    raise cancellation()
                if completion.finish_reason == ERROR:
                    raise RequestFailed(f"llm: the engine failed request {flow.request_id} (KV load failed?)")
                ids, delta_text, finish = list(completion.token_ids), completion.text, completion.finish_reason or ""
                logprobs = entries(completion.logprobs, self.engine.engine.get_tokenizer() if text else None)
                if text is not None:
                    delta = text.update(ids, finish == STOP, output.finished)
                    ids, delta_text = delta.token_ids, delta.text
                    finish = STOP if delta.stop_string is not None else finish
                if sent is not None:
                    ids, delta_text, skipped = sent.skip(ids, delta_text)
                    logprobs = logprobs[skipped:] if logprobs is not None else None
                    if not ids and not delta_text and not finish:
                        continue  # only the first token, sent already: no empty response
                if logprobs is not None:
                    logprobs = logprobs[: len(ids)]
                self._emit(flow, out, ids, delta_text, finish, logprobs, completion.cumulative_logprob)
                if out.req.stream and not finish:
                    interval = max(self.streaming.interval(len(self._active)), params.stream_interval or 1)
                    hold_in_engine(self.engine.engine.output_processor, flow.request_id, interval)
                if finish:
                    if not output.finished:
                        await self.abort(flow, "stop string")
                    return
            raise RequestFailed("llm: the engine ended the request without a finish reason")
        finally:
            if handoff is not None and not handoff.loaded:
                self._free(handoff, reuse=False)  # the worker may still read it

    def _engine_params(
        self, out: "_Output", params: SamplingParams, kv: dict | None, first: int | None = None, detokenize_here: bool = False,
    ) -> SamplingParams:
        """The engine's copy of ``params``: deltas, KV to load (``kv``), a first token to force."""
        engine = engine_params(params) if detokenize_here else params.clone()
        engine.output_kind = RequestOutputKind.DELTA
        if not out.req.stream:  # the first output (KV loaded, first token's time) and the last, nothing between
            engine.stream_interval = max(engine.stream_interval or 1, engine.max_tokens or self.max_model_len)
        extra = dict(engine.extra_args or {})
        if kv is not None:
            extra["kv_transfer_params"] = kv
        if first is not None:
            extra[FIRST_TOKEN_KEY] = first
        engine.extra_args = extra or None
        return engine

    def _free(self, handoff: Handoff, reuse: bool) -> None:
        """Done with a hand-off: its slot back to the pool (``reuse``) or unlinked, its admission freed."""
        handoff.loaded = True
        if not reuse:
            handoff.slot.abandon()  # a worker still waiting on it gives up
        (self.slots.release if reuse else self.slots.discard)(handoff.slot)
        if handoff.ticket is not None:
            handoff.tier.admission.release(handoff.ticket)

    def _loaded(self, handoff: Handoff) -> None:
        """The step that read the KV has run: record it, reuse the slot."""
        head = handoff.slot.header
        scatter = (int(head[Field.SCATTER_START_NS]), int(head[Field.SCATTER_END_NS]))
        nbytes = handoff.wire_bytes or self.fingerprint.bytes_per_token * handoff.num_tokens
        self._free(handoff, reuse=True)
        if scatter[0]:
            self.metrics.record(handoff.transport.value, nbytes, handoff.gather_ns, scatter)

    # ------------------------------------------------------------ remote prefill

    async def _route(self, num_tokens: int) -> list[Tier]:
        """The prefill tiers to try for a prompt this long, in order (routing.py)."""
        candidates = eligible(self.tiers, num_tokens)
        for tier in candidates:
            await self._refresh_ready(tier)
        return order(candidates)

    async def _prefill(
        self, tier: Tier, flow: Flow, req: LLMRequest, ids: list[int], lent: Callable[[Slot], None] | None = None,
    ) -> tuple[list[int], str, list | None, Handoff]:
        """Ask ``tier`` to prefill; ``lent`` is called with the slot lent to it (shm), before the call."""
        if flow.cancelled:
            raise cancellation()
        flow.attempts.append(attempt_id(flow.request_id, len(flow.attempts)))
        inputs = [
            ids_tensor(names.INPUT_IDS, ids),
            string_tensor(names.SAMPLING_PARAMETERS, req.sampling_parameters),
            string_tensor(names.REQUEST_ID, flow.attempts[-1]),
        ]
        kv_bytes = self.fingerprint.bytes_per_token * len(ids)
        try:
            ticket = await tier.admission.enter(kv_bytes)
        except Overloaded as exc:
            raise PrefillUnavailable(str(exc)) from None
        slot = None
        try:
            if tier.url is not None:
                reply = await self._call_remote(tier, flow, ids, req.sampling_parameters)
            else:
                if self.transport is Transport.SHM:
                    slot = self.slots.acquire(kv_bytes)
                    inputs.append(string_tensor(names.KV_SLOT, slot.lend().to_json()))
                    if lent is not None:
                        lent(slot)
                elif self.transfer_dtype != transfer.AUTO:
                    inputs.append(string_tensor(names.KV_DTYPE_INPUT, self.transfer_dtype))
                reply = await self._call_prefill(tier, flow, inputs)
            if flow.cancelled:
                raise cancellation()
            first = reply.array(names.OUTPUT_IDS).reshape(-1).tolist()
            finish = reply.text(names.FINISH_REASON)
            first_logprobs = json.loads(reply.text(names.LOGPROBS))
            kv_ref = json.loads(reply.text(names.KV_REF))
            gather = (int(kv_ref["gather_start_ns"]), int(kv_ref["gather_end_ns"]))
            self._check_prefilled(tier, reply, ids)
            if slot is None:
                kv, scales, name = self._received_kv(tier, reply, kv_ref, ids)
                transport = Transport.TENSOR if tier.url is None else Transport.GRPC
                # Another host's clock: time only the copy here.
                handoff = await self._to_slot(kv, len(ids), transport, gather if tier.url is None else None, scales, name)
            else:
                if not slot.complete(len(ids)):
                    raise PrefillUnavailable(f"{tier.name} answered without writing the KV slot")
                handoff = Handoff(slot, len(ids), Transport.SHM, gather)
            handoff.ticket, handoff.tier = ticket, tier
            return first, finish, first_logprobs, handoff
        except BaseException:
            tier.admission.release(ticket)
            if slot is not None:
                slot.abandon()  # an early load waiting on it gives up
                self.slots.discard(slot)  # prefill's worker may still write it
            raise

    def _received_kv(self, tier: Tier, reply: _Reply, kv_ref: dict, ids: list[int]):
        """The KV prefill returned as a tensor, checked: (payload, scales, transfer dtype)."""
        name = kv_ref.get("transfer_dtype", transfer.AUTO)
        if name not in (transfer.AUTO, self.transfer_dtype):
            raise PrefillUnavailable(f"{tier.name} returned KV in {name!r}, asked for {self.transfer_dtype!r}")
        kv = reply.kv()
        if name == transfer.AUTO:
            validate_kv(self.fingerprint, self.fingerprint, kv, torch.as_tensor(ids), self.max_model_len)
            return kv, None, name
        shape, wire = self.fingerprint.kv_shape(len(ids)), transfer.wire_dtype(name, self.fingerprint.torch_dtype)
        if tuple(kv.shape) != shape or kv.dtype != wire:
            raise KVMismatchError(f"{tier.name} returned {name} KV {tuple(kv.shape)} {kv.dtype}, expected {shape} {wire}")
        scales = None
        if name in transfer.SCALED:
            scales = torch.from_numpy(np.ascontiguousarray(reply.array(names.KV_SCALES), dtype=np.float32))
            if tuple(scales.shape) != shape[:4]:
                raise KVMismatchError(f"{tier.name} returned KV scales {tuple(scales.shape)}, expected {shape[:4]}")
        return kv, scales, name

    def _check_prefilled(self, tier: Tier, reply: _Reply, ids: list[int]) -> None:
        fingerprint = ModelFingerprint.from_json(reply.text(names.KV_FINGERPRINT))
        if fingerprint != self.fingerprint:
            raise KVMismatchError(
                f"{tier.name} serves another model: KV fingerprint {fingerprint.to_json()}, "
                f"this model's {self.fingerprint.to_json()}"
            )
        if not np.array_equal(reply.array(names.KV_TOKEN_IDS).reshape(-1), ids):
            raise PrefillUnavailable(f"{tier.name} returned KV for other tokens")

    async def _refresh_ready(self, tier: Tier) -> bool:
        """Whether the tier's server has its model loaded (asked at most every PREFILL_READY_POLL_S)."""
        if time.monotonic() - tier.checked_at >= PREFILL_READY_POLL_S:
            tier.checked_at = time.monotonic()  # one question at a time
            if tier.url is None:
                tier.ready = await asyncio.to_thread(pb_utils.is_model_ready, tier.model)
            else:
                try:
                    tier.ready = await self._remote(tier).is_model_ready(tier.model, client_timeout=REMOTE_READY_TIMEOUT_S)
                except Exception:  # noqa: BLE001 - unreachable, refused, timed out: not ready
                    tier.ready = False
            tier.checked_at = time.monotonic()
        return tier.ready

    def _remote(self, tier: Tier):
        """The remote tier's gRPC client (asyncio; made in the engine's loop, used only there)."""
        if tier.client is None:
            from tritonclient.grpc.aio import InferenceServerClient

            tier.client = InferenceServerClient(tier.url)
        return tier.client

    async def _call_remote(self, tier: Tier, flow: Flow, ids: list[int], sampling: str | None) -> _Reply:
        """The one response of a gRPC stream request to a prefill tier on another server.

        Same waits as a BLS call (ready, ``prefill_timeout_s``); giving up, or
        the client's cancellation, cancels the gRPC call, which Triton passes to
        the remote prefill as the request's cancellation. The remote server's
        errors carry no status code over the stream: any of them is the tier's
        failure, and local prefill then meets the request's own faults again.
        """
        from tritonclient.grpc import InferInput

        def tensor(name: str, value: np.ndarray) -> InferInput:
            item = InferInput(name, list(value.shape), "BYTES" if value.dtype == np.object_ else "INT64")
            item.set_data_from_numpy(value)
            return item

        inputs = [
            tensor(names.INPUT_IDS, np.asarray(ids, dtype=np.int64)),
            tensor(names.REQUEST_ID, np.array([flow.attempts[-1].encode("utf-8")], dtype=np.object_)),
        ]
        if sampling is not None:
            inputs.append(tensor(names.SAMPLING_PARAMETERS, np.array([sampling.encode("utf-8")], dtype=np.object_)))
        if self.transfer_dtype != transfer.AUTO:
            inputs.append(tensor(names.KV_DTYPE_INPUT, np.array([self.transfer_dtype.encode("utf-8")], dtype=np.object_)))
        client = self._remote(tier)

        async def requests():
            yield {"model_name": tier.model, "inputs": inputs, "request_id": flow.attempts[-1]}

        async def call():
            stream = client.stream_infer(requests())
            try:
                async for result, error in stream:
                    if error is not None:
                        raise PrefillUnavailable(f"{tier.name} failed: {error.message()}")
                    if result.get_response().outputs:
                        return result
                raise PrefillUnavailable(f"{tier.name} returned no output")
            except PrefillUnavailable:
                raise
            except Exception as exc:  # grpc.aio.AioRpcError and the like: the tier, not the request
                raise PrefillUnavailable(f"{tier.name} is unavailable: {_first_line(exc)}") from None
            finally:
                stream.cancel()

        task = asyncio.ensure_future(call())
        try:
            return _Reply.of_grpc(await self._wait_for_prefill(tier, flow, task, task.cancel))
        finally:
            task.cancel()

    async def _wait_for_prefill(self, tier: Tier, flow: Flow, result: asyncio.Future, give_up: Callable[[], object]):
        """``result``, awaited while the tier is ready and ``prefill_timeout_s`` allows."""
        deadline = time.monotonic() + self.prefill_timeout_s
        while not result.done():
            await asyncio.wait({result}, timeout=PREFILL_READY_POLL_S)
            if result.done():
                break
            if flow.cancelled:
                give_up()
                raise cancellation()
            if time.monotonic() > deadline:
                give_up()
                raise PrefillTimeout(f"{tier.name} did not answer in {self.prefill_timeout_s:g} s (prefill_timeout_s)")
            if not await self._refresh_ready(tier):
                give_up()
                raise PrefillUnavailable(f"{tier.name} went down")
        return result.result()

    async def _call_prefill(self, tier: Tier, flow: Flow, inputs) -> _Reply:
        """The one response of a BLS request to prefill; errors say whose fault.

        The request runs on a thread of ``self._bls`` (``exec`` and its
        response iterator block), and llm waits for it no longer than
        prefill is ready and ``prefill_timeout_s`` allows. If prefill's stub
        dies, that thread blocks for ever (Triton 2.51 never ends a dead
        stub's requests, and cannot cancel a BLS request): it is left behind,
        holding nothing of llm's, and later calls start other threads
        (daemon_pool.py). Not Triton's ``async_exec``: it blocks in the
        loop's default executor, and enough stuck calls would starve it.
        """
        request = pb_utils.InferenceRequest(
            model_name=tier.model, inputs=inputs, requested_output_names=_PREFILL_OUTPUTS
        )
        attempt = flow.attempts[-1]
        loop = asyncio.get_running_loop()
        result = loop.create_future()

        def run() -> None:
            try:
                value = list(request.exec(decoupled=True))
            except BaseException as exc:  # noqa: BLE001 - handed to the loop
                loop.call_soon_threadsafe(_settle, result, None, exc)
            else:
                loop.call_soon_threadsafe(_settle, result, value, None)

        self._bls.run(run)
        try:
            # Giving up marks the request on the board: a live prefill stops working on it.
            responses = await self._wait_for_prefill(tier, flow, result, lambda: self.board.cancel(attempt))
        except pb_utils.TritonModelException as exc:
            raise PrefillUnavailable(f"{tier.model} is unavailable: {exc}") from None
        found = None
        for response in responses:
            if response.has_error():
                error = response.error()
                code = error.code() if hasattr(error, "code") else None
                if code == invalid_arg():
                    raise RequestFailed(error.message(), code)
                if code == cancelled() and flow.cancelled:
                    raise cancellation()
                # Cancelled by the tier itself (its own timeout, a restart): the tier failed.
                raise PrefillUnavailable(f"{tier.model} failed: {error.message()}")
            if response.output_tensors():
                found = response
        if found is None:
            raise PrefillUnavailable(f"{tier.model} returned no output")
        return _Reply.of_bls(found)

    async def _to_slot(
        self, kv: torch.Tensor, num_tokens: int, transport: Transport, gather,
        scales: torch.Tensor | None = None, transfer_dtype: str = transfer.AUTO,
    ) -> Handoff:
        """Copy KV held by a Triton tensor into a slot, off the event loop.

        Encoded KV stays encoded: the engine's worker decodes it as it scatters it.
        """
        shape, dtype = tuple(kv.shape), self.fingerprint.torch_dtype
        slot = self.slots.acquire(transfer.encoded_nbytes(transfer_dtype, dtype, shape))
        slot.lend()

        def copy() -> None:
            payload, slot_scales = transfer.views(slot.data, transfer_dtype, dtype, shape)
            payload.copy_(kv)
            if slot_scales is not None:
                slot_scales.copy_(scales)
            slot.stamp_written(num_tokens)

        try:
            start = now_ns()
            await asyncio.to_thread(copy)
        except BaseException:
            self.slots.discard(slot)
            raise
        handoff = Handoff(slot, num_tokens, transport, gather or (start, now_ns()), transfer_dtype=transfer_dtype)
        if transfer_dtype != transfer.AUTO:
            handoff.wire_bytes = kv.numel() * kv.element_size() + (0 if scales is None else scales.numel() * 4)
        return handoff

    # ---------------------------------------------------------------- responses

    def _emit(
        self, flow: Flow, out: _Output, ids: list[int], text: str, finish: str,
        logprobs: list[dict] | None = None, cumulative: float | None = None,
    ) -> None:
        """Send the tokens kept so far with this delta, or keep them for a later response."""
        if cumulative is not None:
            out.cumulative = cumulative
        if ids:
            out.sent += len(ids)
            if out.first_at is None:
                out.first_at = time.monotonic()
        if finish:
            self.serving.finished(out.num_input, out.sent, out.n, out.arrival, out.first_at, time.monotonic())
        out.ids.extend(ids)
        out.text.append(text)
        if logprobs is not None:
            out.logprobs = [*(out.logprobs or []), *logprobs]
        if not finish:
            if not out.req.stream or not out.ids:
                return
            # The first token at once; then a response once the stream holds as
            # many tokens as stream_interval asks under the current load.
            if out.responses and len(out.ids) < self.streaming.interval(len(self._active)):
                return
        full = "".join(out.text)
        if out.req.prepend_input and out.req.text:  # not streaming (llm_request refuses it with a stream)
            full = out.req.text + full
        flow.sender.send(self._response(out, out.ids, full, finish, out.logprobs), final=bool(finish))
        out.responses += 1
        out.ids, out.text, out.logprobs = [], [], None

    @staticmethod
    def _response(out: _Output, ids: list[int], text: str, finish: str, logprobs: list[dict] | None):
        tensors = [string_tensor(names.TEXT_OUTPUT, text), ids_tensor(names.OUTPUT_IDS, ids)]
        req = out.req
        if req.return_finish_reason:
            tensors.append(string_tensor(names.FINISH_REASON, finish or "None"))
        if req.return_num_input_tokens:
            tensors.append(pb_utils.Tensor(names.NUM_INPUT_TOKENS, np.array([out.num_input], dtype=np.uint32)))
        if req.return_num_output_tokens:
            tensors.append(pb_utils.Tensor(names.NUM_OUTPUT_TOKENS, np.array([len(ids)], dtype=np.uint32)))
        if req.return_logprobs:
            tensors.append(string_tensor(names.LOGPROBS, json.dumps(logprobs)))
        if req.return_cumulative_logprob:
            cumulative = np.nan if out.cumulative is None else out.cumulative
            tensors.append(pb_utils.Tensor(names.CUMULATIVE_LOGPROB, np.array([cumulative], dtype=np.float32)))
        return pb_utils.InferenceResponse(output_tensors=tensors)


class _Early:
    """A request added to the engine while prefill runs (kv/early.py): its outputs, the first awaited already."""

    def __init__(self, outputs):
        self._outputs = outputs
        self._first = asyncio.ensure_future(outputs.__anext__())  # adds the request now

    async def stream(self):
        yield await self._first
        async for output in self._outputs:
            yield output

    async def close(self) -> None:
        """Abort the request in the engine if it still runs (vLLM's generate does, when cancelled or closed)."""
        self._first.cancel()
        try:
            await self._first
        except (asyncio.CancelledError, StopAsyncIteration, Exception):  # noqa: BLE001 - ending it is all that counts
            pass
        await self._outputs.aclose()


def _settle(future: asyncio.Future, value, exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(value)


def _output(response, name: str):
    tensor = pb_utils.get_output_tensor_by_name(response, name)
    if tensor is None:
        raise PrefillUnavailable(f"the prefill response has no {name}")
    return tensor


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class UnifiedModel(LLMModel):
    """The A/B baseline: ``llm``'s interface and code, one engine, no prefill tier.

    Its config.pbtxt sets ``prefill_model`` to "" so every prompt is prefilled
    by its own engine; what it measures against ``llm`` is the split itself.
    """

    name = "unified"
