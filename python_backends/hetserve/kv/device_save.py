"""Saving KV from a GPU's paged cache: each copy to the host slot on a side CUDA stream.

On a GPU, vLLM calls ``save_kv_layer`` right after it queued layer i's
attention, and goes on queueing layer i + 1 while the GPU still runs i. The
saver queues layer i's copy on a side stream that first waits for everything
queued so far on the compute stream (so it reads layer i's finished pages):
gather the layer's pages into a dense device buffer, encode it in the transfer
dtype there (kv/transfer.py; no pass on the host), and copy it to the slot
with ``non_blocking``. That copy is a DMA only into page-locked memory, so the
slot's mapping is registered with ``cudaHostRegister`` once per mapping (and
unregistered before the mapping goes). The copy of layer i then overlaps the
compute of the layers after it; ``finish`` waits for the side stream before the
slot is stamped complete. The device buffers of queued copies are held until
then: at most one prompt's KV (whole, or encoded) on the device at once.

Without CUDA (the CPU twin the tests run: the same gather, encode and copy,
in order, no stream) every step runs at once. On the CPU the connector does
not use this: there the converters copy straight from the pages into the slot
(``transfer.gather_encoded``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from types import ModuleType

import torch

from hetserve.kv import transfer

logger = logging.getLogger(__name__)


class DeviceSaver:
    def __init__(self, pages: ModuleType, device: torch.device):
        self._pages = pages
        self._device = device
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._held: list[torch.Tensor] = []  # device buffers read by queued copies
        self._registered: set[int] = set()  # data_ptr of page-locked slot mappings
        self._told_unregistered = False

    @property
    def asynchronous(self) -> bool:
        return self._stream is not None

    def register(self, flat: torch.Tensor) -> None:
        """Page-lock a slot mapping so that copies into it are asynchronous DMA (CUDA only)."""
        if self._stream is None or flat.data_ptr() in self._registered:
            return
        err = torch.cuda.cudart().cudaHostRegister(flat.data_ptr(), flat.numel(), 0)
        if int(err) != 0:  # still correct, only synchronous: say so once
            if not self._told_unregistered:
                self._told_unregistered = True
                logger.warning("cudaHostRegister of a KV slot failed (%s): device->host KV copies will not overlap", err)
            return
        self._registered.add(flat.data_ptr())

    def unregister(self, flat: torch.Tensor) -> None:
        """Before a registered mapping is dropped (MappingCache's on_drop)."""
        if flat.data_ptr() in self._registered:
            self.finish()  # no copy may still target it
            torch.cuda.cudart().cudaHostUnregister(flat.data_ptr())
            self._registered.discard(flat.data_ptr())

    def save(
        self, layers: Sequence[torch.Tensor], block_ids: Sequence[int],
        payload: torch.Tensor, scales: torch.Tensor | None, name: str,
    ) -> None:
        """Queue the copy of ``layers`` into the host views ``payload`` (and ``scales``), in ``name``."""
        stream = self._stream
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(self._device))  # the layers' compute, as queued
        with contextlib.nullcontext() if stream is None else torch.cuda.stream(stream):
            model_dtype = layers[0].dtype
            dense = torch.empty(payload.shape, dtype=model_dtype, device=self._device)
            self._pages.gather(layers, block_ids, dense)
            copies = [(payload, dense)]
            if not transfer.direct(name, model_dtype):
                if transfer.check(name) in transfer.SCALED and scales is None:
                    raise ValueError(f"KV in {name} needs its scales")
                encoded = torch.empty(payload.shape, dtype=payload.dtype, device=self._device)
                scaled = None if scales is None else torch.empty(scales.shape, dtype=torch.float32, device=self._device)
                transfer.encode_into(dense, name, encoded, scaled)
                copies = [(payload, encoded)] + ([] if scales is None else [(scales, scaled)])
            for host, device_tensor in copies:
                host.copy_(device_tensor, non_blocking=stream is not None)
                if stream is not None:
                    self._held.append(device_tensor)

    def finish(self) -> None:
        """Wait until every queued copy is in host memory."""
        if self._stream is not None:
            self._stream.synchronize()
        self._held.clear()
