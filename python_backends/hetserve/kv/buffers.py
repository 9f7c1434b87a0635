"""Reusable shared-memory buffers for KV crossing into and out of vLLM's worker.

The Triton model and vLLM's worker are different processes. The model owns a
pool of files in /dev/shm, each big enough for the largest KV it accepts, and
tells the engine (through ``kv_transfer_params``) which file a request's KV is
in or goes to. Files are reused: a page that was written once costs a tenth of
a fresh one. A file name is never reused for a different file, so the worker's
cache of mappings by name can never alias a stale mapping.

``multiprocessing.shared_memory`` is not used: its resource tracker deletes a
segment when any process that opened it exits.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from math import prod

import torch

logger = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
# Environment variable naming this server's prefix for /dev/shm files, so the
# launcher can remove exactly what its server created.
PREFIX_ENV = "HETSERVE_SHM_PREFIX"


def map_file(path: str, nbytes: int) -> torch.Tensor:
    """Map (creating if needed) ``path`` as a shared uint8 tensor of ``nbytes``."""
    return torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)


def view_as(flat: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """The first bytes of a mapped buffer as a contiguous ``dtype`` tensor of ``shape``."""
    nbytes = prod(shape) * torch.empty((), dtype=dtype).element_size()
    if nbytes > flat.numel():
        raise ValueError(f"KV of shape {shape} ({nbytes} bytes) does not fit a {flat.numel()}-byte buffer")
    return flat[:nbytes].view(dtype).view(shape)


@dataclass(eq=False, slots=True)
class ShmBuffer:
    path: str
    nbytes: int
    data: torch.Tensor = field(repr=False)  # [nbytes] uint8, shared mapping

    def view(self, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        return view_as(self.data, dtype, shape)


class BufferPool:
    """A growable free list of equally sized /dev/shm buffers owned by one process."""

    def __init__(self, name: str, nbytes: int, directory: str = SHM_DIR):
        prefix = os.environ.get(PREFIX_ENV, "hetserve")
        self._stem = os.path.join(directory, f"{prefix}-{name}-{os.getpid()}")
        self.nbytes = nbytes
        self._free: list[ShmBuffer] = []
        self._all: set[str] = set()
        self._seq = itertools.count()
        self._lock = threading.Lock()

    def acquire(self) -> ShmBuffer:
        with self._lock:
            if self._free:
                return self._free.pop()
            path = f"{self._stem}-{next(self._seq)}"
            self._all.add(path)
        return ShmBuffer(path, self.nbytes, map_file(path, self.nbytes))

    def release(self, buf: ShmBuffer) -> None:
        """Return a buffer nobody reads or writes any more."""
        with self._lock:
            self._free.append(buf)

    def discard(self, buf: ShmBuffer) -> None:
        """Drop a buffer another process may still touch (an aborted request)."""
        with self._lock:
            self._all.discard(buf.path)
        _unlink(buf.path)

    def close(self) -> None:
        with self._lock:
            paths, self._all, self._free = list(self._all), set(), []
        for path in paths:
            _unlink(path)

    @property
    def size(self) -> int:
        return len(self._all)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class MappingCache:
    """The worker's side: mappings of pool files by name, least recently used out."""

    def __init__(self, capacity: int = 64):
        self._maps: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._capacity = capacity

    def get(self, path: str, nbytes: int) -> torch.Tensor:
        flat = self._maps.get(path)
        if flat is None or flat.numel() < nbytes:
            if not os.path.exists(path):
                raise FileNotFoundError(f"KV buffer {path} does not exist")
            flat = map_file(path, nbytes)
            self._maps[path] = flat
            while len(self._maps) > self._capacity:
                self._maps.popitem(last=False)
        self._maps.move_to_end(path)
        return flat
