"""HetserveConnector: vLLM v1 KV connector between the paged cache and KV slots.

Contract (which side calls what):

* The caller (a Triton model) puts ``{"hetserve": {...}}`` into
  ``SamplingParams.extra_args["kv_transfer_params"]`` (connector_params.py):
  - producer (prefill): ``{"slot": PATH, "capacity": N, "nonce": X}``: when the
    prompt is complete, write its KV for *every* prompt token into the slot at
    PATH in the interchange layout ``[L, 2, H, T, D]``, then stamp X into the
    slot's header (the reader's proof that the KV is complete);
  - consumer (llm): ``{"slot": PATH, "capacity": N, "nonce": X,
    "num_tokens": T}``: the slot holds KV for the first T prompt tokens; put
    it into the paged cache instead of computing it (vLLM still computes the
    prompt's last token: its KV from the slot is put back after that step);
  - consumer, early (``"early_wait_s": S`` added): the slot is still being
    written; vLLM parks the request while this connector's worker waits for
    the slot, loads it, and waits for the first token (kv/early.py);
  - either may add ``"dtype": NAME``, a transfer dtype (kv/transfer.py): the
    slot's KV is (to be) encoded in it; the worker encodes as it gathers and
    decodes as it scatters. Without it, the model's dtype.
* Scheduler side (EngineCore process): decides what to move and in which
  blocks; ``request_finished`` returns ``{"hetserve": {"num_tokens": T}}`` for
  a saved request, which reaches the caller as ``RequestOutput.kv_transfer_params``.
* Worker side (the process that owns the paged cache): does the copies, once
  per KV byte, synchronously (a load before the forward pass, a save after it;
  an early load in the first step after its slot was stamped, or layer by
  layer as a layer-wise writer publishes them: kv/early.py).
  A failed copy never raises into vLLM (that would kill the engine): a failed
  load reports the request's blocks (``get_block_ids_with_load_errors``), and
  vLLM fails that request alone; a failed save leaves the slot unstamped, and
  the caller sees it.

The caller owns the slots; the engine only maps them by name. A consumer
loads a request's KV at most once: after a preemption vLLM recomputes it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorTransferResults,
)
from vllm.model_executor.models.utils import extract_layer_index

from hetserve import setup_logging
from hetserve.kv import cpu_attn, flash, transfer
from hetserve.kv.device_save import DeviceSaver
from hetserve.kv.early import EarlyLoads, engine_inputs, hold_idle, layers_per_idle_step
from hetserve.kv.slots import HEADER_BYTES, Field, MappingCache, SlotError, header, now_ns, stamp, written_tokens

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

from hetserve.connector_params import EARLY_WAIT_KEY, PARAMS_KEY

logger = logging.getLogger(__name__)


SAVE_ALL, SAVE_LAYER = "all", "layer"  # kv_save: every layer at the end of the step, or each as it is done
SAVE_MODES = (SAVE_ALL, SAVE_LAYER)
IDLE_WAIT_S = 0.02  # how long a step with nothing but parked requests is held back, at most (kv/early.py)
IDLE_POLL_S = 0.001


def transfer_params(request: "Request") -> dict[str, Any] | None:
    params = request.kv_transfer_params or {}
    return params.get(PARAMS_KEY)


@dataclass(slots=True)
class TransferSpec:
    """One request's KV move between a slot and the paged cache."""

    req_id: str
    path: str
    capacity: int
    nonce: int
    num_tokens: int  # tokens the slot holds: fixes its [L, 2, H, T, D] layout
    count: int  # leading tokens to move
    dtype: str = transfer.AUTO  # the slot's transfer dtype
    block_ids: list[int] = field(default_factory=list)
    wait_s: float | None = None  # an early load: wait for the slot at most this long (kv/early.py)


@dataclass
class HetserveConnectorMetadata(KVConnectorMetadata):
    loads: list[TransferSpec] = field(default_factory=list)
    saves: list[TransferSpec] = field(default_factory=list)
    # Early loads in the step that computes their prompt's last token: prefill's KV of it goes back after.
    restores: list[TransferSpec] = field(default_factory=list)


@dataclass(slots=True)
class _Saving:
    spec: TransferSpec
    computed: int = 0
    saved: bool = False


class HetserveConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole, kv_cache_config: Any = None):
        super().__init__(vllm_config, role, kv_cache_config)
        setup_logging()  # in vLLM's EngineCore (scheduler side) or worker process
        cfg = self._kv_transfer_config
        self._producer = cfg.is_kv_producer
        self._consumer = cfg.is_kv_consumer
        self._save_mode = cfg.get_from_extra_config("save", SAVE_ALL)
        if self._save_mode not in SAVE_MODES:
            raise ValueError(f"kv_save must be one of {', '.join(SAVE_MODES)}, got {self._save_mode!r}")
        # Scheduler side.
        self._saving: dict[str, _Saving] = {}
        self._to_load: dict[str, TransferSpec] = {}
        self._early_to_start: dict[str, TransferSpec] = {}
        self._early_started: dict[str, TransferSpec] = {}  # until the request's first step
        self._loaded: set[str] = set()
        # Worker side.
        self._layers: list[torch.Tensor] = []
        self._pages = cpu_attn  # the converter of this engine's page layout (register_kv_caches)
        self._position: dict[str, int] = {}  # layer name -> index in _layers
        # kv_save "layer": request -> [layers saved in this step, ns spent copying them]
        self._by_layer: dict[str, list[int]] = {}
        self._told_layerwise = False
        self._maps = MappingCache()
        self._device: DeviceSaver | None = None  # pages on a GPU: saves go through a side stream
        self._load_errors: set[int] = set()
        self._recomputed: list[TransferSpec] = []  # loaded in this step, the slot holding more than was loaded
        self._early = EarlyLoads(self._scatter_layers, lambda path, nbytes: self._maps.get(path, nbytes))
        self._headers = MappingCache()  # scheduler side: the parked requests' slot headers
        self._inputs: Any = False  # scheduler side: the EngineCore's input queue (None: not found; False: not looked for)
        self._layers_per_idle_step = layers_per_idle_step(
            vllm_config.model_config.get_num_layers(vllm_config.parallel_config)
        )

    # ---------------------------------------------------------------- scheduler

    def on_new_request(self, request: "Request") -> None:
        params = transfer_params(request)
        if self._producer and params and "slot" in params:
            n = request.num_prompt_tokens
            spec = TransferSpec(
                request.request_id, params["slot"], int(params["capacity"]), int(params["nonce"]), n, n,
                str(params.get("dtype", transfer.AUTO)),
            )
            self._saving[request.request_id] = _Saving(spec)

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int | None, bool]:
        params = transfer_params(request)
        if not (self._consumer and params and "num_tokens" in params) or request.request_id in self._loaded:
            return 0, False
        if num_computed_tokens:
            # Only the whole prompt is loaded; with local hits, recompute instead.
            logger.warning("request %s has %d locally cached tokens; not loading its KV", request.request_id, num_computed_tokens)
            return 0, False
        # A load may not cover the whole prompt (the scheduler needs one token
        # to compute); callers send the KV's tokens plus at least one.
        return min(int(params["num_tokens"]), request.num_prompt_tokens - 1), EARLY_WAIT_KEY in params

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int):
        if num_external_tokens <= 0:
            return
        params = transfer_params(request)
        spec = TransferSpec(
            request.request_id,
            params["slot"],
            int(params["capacity"]),
            int(params["nonce"]),
            int(params["num_tokens"]),
            num_external_tokens,
            str(params.get("dtype", transfer.AUTO)),
        )
        if EARLY_WAIT_KEY in params:  # parked now: its blocks are known now, not when it is scheduled
            spec.wait_s = float(params[EARLY_WAIT_KEY])
            spec.block_ids = list(blocks.get_block_ids()[0])
            self._early_to_start[request.request_id] = spec
        else:
            self._to_load[request.request_id] = spec
        self._loaded.add(request.request_id)

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        if (
            scheduler_output.total_num_scheduled_tokens == 0 and self._early_started
            and not self._early_to_start and not scheduler_output.finished_req_ids
        ):
            self._hold_idle_step()
        meta = HetserveConnectorMetadata()
        scheduled = scheduler_output.num_scheduled_tokens
        meta.loads.extend(self._early_to_start.values())
        self._early_started.update(self._early_to_start)
        self._early_to_start.clear()
        for new in scheduler_output.scheduled_new_reqs:
            spec = self._to_load.pop(new.req_id, None)
            if spec is not None:
                spec.block_ids = list(new.block_ids[0])
                meta.loads.append(spec)
            early = self._early_started.pop(new.req_id, None)
            if early is not None and early.num_tokens > early.count:
                early = replace(early, block_ids=list(new.block_ids[0]))
                meta.restores.append(early)
            saving = self._saving.get(new.req_id)
            if saving is not None:
                saving.spec.block_ids = list(new.block_ids[0])
                saving.computed = new.num_computed_tokens + scheduled.get(new.req_id, 0)
                self._maybe_save(saving, meta)
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            saving = self._saving.get(req_id)
            if saving is None or saving.saved:
                continue
            new_ids = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:  # preempted: the list is complete
                saving.spec.block_ids = list(new_ids[0]) if new_ids else []
            elif new_ids:
                saving.spec.block_ids.extend(new_ids[0])
            saving.computed = cached.num_computed_tokens[i] + scheduled.get(req_id, 0)
            self._maybe_save(saving, meta)
        return meta

    def _hold_idle_step(self) -> None:
        """A step that computes nothing, only parked requests waiting: hold it back until one can move (kv/early.py)."""
        if self._inputs is False:  # looked for once: the EngineCore calls the scheduler that calls this
            self._inputs = engine_inputs()

        def headers():
            return (
                (header(self._headers.get(spec.path, HEADER_BYTES)), spec.nonce, spec.num_tokens)
                for spec in self._early_started.values()
            )

        hold_idle(headers, self._inputs, self._layers_per_idle_step, IDLE_WAIT_S, IDLE_POLL_S)

    @staticmethod
    def _maybe_save(saving: _Saving, meta: HetserveConnectorMetadata) -> None:
        if not saving.saved and saving.computed >= saving.spec.num_tokens:
            meta.saves.append(saving.spec)
            saving.saved = True

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._loaded.discard(request.request_id)
        self._to_load.pop(request.request_id, None)
        self._early_to_start.pop(request.request_id, None)
        self._early_started.pop(request.request_id, None)
        saving = self._saving.pop(request.request_id, None)
        if saving is None or not saving.saved:
            return False, None
        # The save ran synchronously in the step that completed the prompt, so
        # the blocks can be freed now.
        return False, {PARAMS_KEY: {"num_tokens": saving.spec.num_tokens}}

    # ------------------------------------------------------------------- worker

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        ordered = sorted(kv_caches.items(), key=lambda item: extract_layer_index(item[0]))
        self._layers = [tensor for _, tensor in ordered]
        self._position = {name: i for i, (name, _) in enumerate(ordered)}
        backend = _attention_backend(self._vllm_config)
        self._pages = converter(backend)
        shape = tuple(self._layers[0].shape)
        if len(shape) != 4 or shape[3] % 2:
            raise ValueError(
                f"HetserveConnector expects {backend}'s pages as [num_blocks, kv_heads, block_size, 2 * head_dim], "
                f"got {shape}"
            )
        path = ""
        if self._pages is cpu_attn:  # which of CPU_ATTN's page layouts: vLLM's kernel path decides
            self._pages, isa = cpu_attn.converter_for(self._layers[0].dtype, shape[2], shape[3] // 2)
            path = f", kernel path {isa!r}"
        device = self._layers[0].device
        if device.type == "cuda":
            self._device = DeviceSaver(self._pages, device)
            self._maps = MappingCache(on_drop=self._device.unregister)
            path += ", saved through a side CUDA stream"
        logger.info("KV pages: %s, block size %d%s", backend, shape[2], path)
        self._pages.warm_up(self._layers)

    def _slot(self, spec: TransferSpec, tokens: slice | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The slot's header and its KV's ``tokens`` (the first ``spec.count``): payload and scales (or None)."""
        layer = self._layers[0]
        shape = (len(self._layers), 2, layer.shape[1], spec.num_tokens, layer.shape[3] // 2)
        flat = self._maps.get(spec.path, spec.capacity)
        if self._device is not None:
            self._device.register(flat)
        payload, scales = transfer.views(flat, spec.dtype, layer.dtype, shape)
        tokens = tokens or slice(0, spec.count)
        return header(flat), payload[:, :, :, tokens], None if scales is None else scales[:, :, :, tokens]

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, HetserveConnectorMetadata)
        for spec in meta.loads:
            if spec.wait_s is not None:
                self._early.add(spec)
                continue
            try:
                self._load(spec)
                if spec.num_tokens > spec.count:
                    self._recomputed.append(spec)
            except Exception as exc:  # noqa: BLE001 - fail the request, not the engine
                logger.warning("KV load for request %s failed: %s", spec.req_id, exc)
                self._load_errors.update(spec.block_ids)

    def _load(self, spec: TransferSpec) -> None:
        """Copy the slot's KV (its first ``spec.count`` tokens) into the request's blocks."""
        head = self._slot(spec)[0]
        if (written_tokens(head, spec.nonce) or 0) < spec.num_tokens:
            raise SlotError(f"slot {spec.path} does not hold this request's KV")
        head[Field.SCATTER_START_NS] = now_ns()
        self._scatter_layers(spec, 0, None)
        head[Field.SCATTER_END_NS] = now_ns()

    def _scatter_layers(self, spec: TransferSpec, start: int, stop: int | None) -> None:
        """Copy layers ``start:stop`` of the slot's KV (its first ``spec.count`` tokens) into the request's blocks."""
        _, payload, scales = self._slot(spec)
        layers = slice(start, stop)
        if not self._layers[layers]:
            return
        transfer.scatter_decoded(
            self._pages, payload[layers], None if scales is None else scales[layers], spec.dtype,
            self._layers[layers], spec.block_ids,
        )

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        """Early loads that ended; a failed one is also finished (vLLM then fails or frees its request)."""
        finished, failed = self._early.advance(finished_req_ids)
        return KVConnectorTransferResults(finished_recving=finished, failed_recving=failed)

    def get_block_ids_with_load_errors(self) -> set[int]:
        failed, self._load_errors = self._load_errors, set()
        return failed

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        """kv_save "layer": copy this layer out as soon as vLLM has run its attention.

        On a GPU the copy of layer i is queued on a side stream and overlaps the
        compute of the layers after it (kv/device_save.py). On the CPU the copies
        run in between, on the same threads, a group of layers at a time (as
        many as the converter has threads: it splits a copy by layer), and each
        group, once in the slot, is published in its header for an early reader
        (kv/early.py). With kv_save "all" every layer is copied at once in
        ``wait_for_save``.
        """
        if self._save_mode != SAVE_LAYER:
            return
        meta = self._get_connector_metadata()
        assert isinstance(meta, HetserveConnectorMetadata)
        i = self._position.get(layer_name)
        if i is None or not meta.saves:
            return
        # A GPU queues each layer's copy; the CPU copies as many layers at a time as the converter has threads.
        layers = layer_group(i, len(self._layers), 1 if self._device is not None else torch.get_num_threads())
        if layers is None:
            return
        for spec in meta.saves:
            try:
                head, payload, scales = self._slot(spec)
                start = now_ns()
                self._save(self._layers[layers], spec, payload[layers], None if scales is None else scales[layers])
                done = self._by_layer.setdefault(spec.req_id, [0, 0])
                done[0] += layers.stop - layers.start
                done[1] += now_ns() - start
                if self._device is None and done[0] == i + 1:  # layers 0..i are in the slot (a GPU's are only queued)
                    head[Field.NUM_TOKENS] = spec.num_tokens
                    head[Field.LAYERS_WRITTEN] = i + 1  # an early reader may scatter them now (kv/early.py)
            except Exception as exc:  # noqa: BLE001 - wait_for_save copies every layer again
                logger.warning("KV save of layers %d-%d for request %s failed: %s", layers.start, i, spec.req_id, exc)

    def _restore_recomputed(self) -> None:
        """Write the slot's KV back over the prompt tokens this step computed itself.

        vLLM computes at least the prompt's last token (its logits give the
        first generated token, which ForceFirstToken fixes to prefill's). That
        token's K and V then come from a one-token pass over the loaded cache,
        which vLLM's CPU kernels need not round as prefill's pass over the
        whole prompt: with two OpenMP threads per engine, later logprobs then
        differed from one engine's by up to 0.03 in bfloat16 (with one
        thread, not at all; README, "Exactness"). Every later step reads
        them, so after the forward pass prefill's values go back in and the
        cache holds what one engine's prefill writes. The copy starts at that
        token's block (converters write from a block's start): at most a
        block of tokens per layer, on average half of one.
        """
        bs = self._layers[0].shape[2] if self._layers else 1
        for spec in self._recomputed:
            first = spec.count // bs  # the block of the first recomputed token
            try:
                _, payload, scales = self._slot(spec, slice(first * bs, spec.num_tokens))
                transfer.scatter_decoded(self._pages, payload, scales, spec.dtype, self._layers, spec.block_ids[first:])
            except Exception as exc:  # noqa: BLE001 - the engine's own values stay: close, not exact
                logger.warning("request %s: restoring the KV of its recomputed prompt tokens failed: %s", spec.req_id, exc)
        self._recomputed.clear()

    def wait_for_save(self) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, HetserveConnectorMetadata)
        self._recomputed.extend(spec for spec in meta.restores if self._early.loaded(spec.req_id))
        self._restore_recomputed()
        for spec in meta.saves:
            layers_saved, copy_ns = self._by_layer.pop(spec.req_id, (0, 0))
            by_layer = layers_saved == len(self._layers)
            if self._save_mode == SAVE_LAYER and not by_layer:
                logger.warning(
                    "request %s: %d of %d layers saved layer by layer; copying all of them now",
                    spec.req_id, layers_saved, len(self._layers),
                )
            elif by_layer and not self._told_layerwise:
                self._told_layerwise = True
                logger.info("KV saved layer by layer (%d layers) as vLLM finished each", len(self._layers))
            try:
                head, payload, scales = self._slot(spec)
                start = now_ns()
                if not by_layer:  # kv_save "all", or a layer-wise save that missed a layer
                    # (not the layers already published: an early reader may be reading them)
                    rest = slice(int(head[Field.LAYERS_WRITTEN]) if self._device is None else 0, None)
                    if self._layers[rest]:
                        self._save(self._layers[rest], spec, payload[rest], None if scales is None else scales[rest])
                if self._device is not None:
                    self._device.finish()  # the queued device->host copies are in the slot
                end = now_ns()
                # Layer by layer, the copies ran between the layers' compute: the
                # gather interval is their total time, ending now (so the hand-off
                # histograms count copying, not the forward pass between copies).
                head[Field.GATHER_START_NS] = end - copy_ns if by_layer else start
                head[Field.GATHER_END_NS] = end
                stamp(head, spec.nonce, spec.num_tokens)  # last: the KV is complete
            except Exception as exc:  # noqa: BLE001 - the caller finds the slot unstamped
                logger.warning("KV save for request %s failed: %s", spec.req_id, exc)
        self._by_layer.clear()


    def _save(self, layers: list[torch.Tensor], spec: TransferSpec, payload: torch.Tensor, scales) -> None:
        """Copy (and encode) ``layers``' KV of ``spec`` into the slot views: on a GPU queued, else at once."""
        if self._device is not None:
            self._device.save(layers, spec.block_ids, payload, scales, spec.dtype)
        else:
            transfer.gather_encoded(self._pages, layers, spec.block_ids, payload, scales, spec.dtype)


def layer_group(i: int, num_layers: int, size: int) -> slice | None:
    """The layers to copy once layer ``i`` of ``num_layers`` has run (they run in order), in groups of
    ``size``: the group that ``i`` completes, or None while it is not complete."""
    size = max(size, 1)
    if (i + 1) % size and i + 1 < num_layers:
        return None
    return slice(i - i % size, i + 1)


def converter(backend: str):
    """The module that converts ``backend``'s pages: one per page layout."""
    if backend == "CPU_ATTN":
        return cpu_attn
    if backend in flash.BACKENDS:
        return flash
    raise ValueError(
        f"HetserveConnector has no converter for the {backend} attention backend's KV pages "
        f"(it converts CPU_ATTN, {', '.join(flash.BACKENDS)})"
    )


def _attention_backend(vllm_config) -> str:
    """The name of the attention backend of the model's layers (one for all of them)."""
    from vllm.distributed.kv_transfer.kv_connector.utils import get_current_attn_backends

    names = sorted({backend.get_name() for backend in get_current_attn_backends(vllm_config)})
    if len(names) != 1:
        raise ValueError(f"HetserveConnector needs one attention backend for every layer, got {names}")
    return names[0]
