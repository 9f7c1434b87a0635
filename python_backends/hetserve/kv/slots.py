"""KV slots: reusable, pre-allocated /dev/shm files that carry one request's KV.

The Triton models and vLLM's workers are different processes; KV crosses
between them through slot files mapped by each (``torch.from_file``), never
through a stub or the server. Decode-first ownership: the model that consumes
KV (``llm``) owns its slots. For a remote prefill it lends one by reference
(:class:`SlotRef`) to the ``prefill`` model; prefill's vLLM worker writes the
KV into it straight from its paged cache, and llm's vLLM worker reads it
straight into its own. A slot is reused only after its reader is done; one
that another process may still touch (a cancelled or failed request) is
discarded (unlinked) instead, and its name is never reused, so a worker's cache
of mappings by name can never alias a stale file.

A slot file: ``[0, HEADER_BYTES)`` header of int64 fields (:class:`Field`),
then the KV in the interchange layout ``[L, 2, H, T, D]``. The writer sets
NONCE and NUM_TOKENS *after* its copy, so a reader that finds the nonce it
expects knows the KV is complete; both workers stamp their copy times
(CLOCK_MONOTONIC, one clock for every process of a host) for the metrics.

Files are allocated up front (``posix_fallocate``): a full /dev/shm fails one
request with an error instead of a SIGBUS in whoever touches the page. Sizes
come in powers of two, so slots are reused across prompt lengths; idle slots
beyond a byte cap are unlinked. ``multiprocessing.shared_memory`` is not used:
its resource tracker deletes a segment when any process that opened it exits.
"""

from __future__ import annotations

import glob
import itertools
import json
import logging
import os
import re
import secrets
import threading
import time
from collections import OrderedDict, defaultdict
from dataclasses import asdict, dataclass, field
from enum import IntEnum
from math import prod

import torch

from hetserve import shm

logger = logging.getLogger(__name__)

HEADER_BYTES = 4096  # keeps the KV page-aligned
MIN_SLOT_BYTES = 1 << 20
DEFAULT_MAX_IDLE_BYTES = 1 << 30
_SAFE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,200}")


class Field(IntEnum):
    """int64 fields of a slot's header."""

    NONCE = 0  # set by the writer once the KV is complete
    NUM_TOKENS = 1
    GATHER_START_NS = 2
    GATHER_END_NS = 3
    SCATTER_START_NS = 4
    SCATTER_END_NS = 5
    # An early load (the consumer's engine waits for the KV while prefill runs): the
    # consumer's caller writes prefill's first token (id + 1) once prefill answered,
    # or ABANDONED if it gave up on this lending; the consumer's worker finishes
    # the load on either.
    FIRST_TOKEN = 6
    ABANDONED = 7
    # A layer-wise writer (prefill's kv_save "layer") publishes its progress
    # before the stamp: NUM_TOKENS first, then after each layer's copy the number
    # of leading layers complete; an early reader scatters those while prefill
    # computes the rest, and counts the layers it has read (for the scheduler).
    LAYERS_WRITTEN = 8
    LAYERS_READ = 9


class SlotError(RuntimeError):
    """A slot that cannot be created, found or read."""


def map_file(path: str, nbytes: int) -> torch.Tensor:
    """Map an existing file as a shared uint8 tensor of ``nbytes``."""
    if not os.path.exists(path):  # from_file would create it, sparse: a SIGBUS waiting to happen
        raise SlotError(f"KV slot {path} does not exist")
    return torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)


def header(flat: torch.Tensor) -> torch.Tensor:
    """The header of a mapped slot as int64 values."""
    return flat[:HEADER_BYTES].view(torch.int64)


def kv_view(flat: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...], offset: int = 0) -> torch.Tensor:
    """A contiguous ``dtype`` tensor of ``shape`` in a mapped slot, ``offset`` bytes after the header
    (the KV at 0; an encoded KV's scales after its payload: kv/transfer.py)."""
    nbytes = prod(shape) * torch.empty((), dtype=dtype).element_size()
    start = HEADER_BYTES + offset
    if start + nbytes > flat.numel():
        raise SlotError(f"KV of shape {shape} ({offset + nbytes} bytes) does not fit a {flat.numel()}-byte slot")
    return flat[start : start + nbytes].view(dtype).view(shape)


def now_ns() -> int:
    return time.monotonic_ns()


def stamp(head: torch.Tensor, nonce: int, num_tokens: int) -> None:
    """Mark a slot's KV complete for the lending ``nonce`` (after the copy, nonce last)."""
    head[Field.NUM_TOKENS] = num_tokens
    head[Field.NONCE] = nonce


def first_token(head: torch.Tensor) -> int | None:
    """The first token the caller wrote for an early load, or None if not yet."""
    value = int(head[Field.FIRST_TOKEN])
    return value - 1 if value > 0 else None


def written_layers(head: torch.Tensor, num_tokens: int) -> int:
    """How many leading layers of ``num_tokens`` tokens a layer-wise writer completed (before its stamp).

    The header is zeroed at each lending, so a count here is this lending's.
    """
    return int(head[Field.LAYERS_WRITTEN]) if int(head[Field.NUM_TOKENS]) == num_tokens else 0


def written_tokens(head: torch.Tensor, nonce: int) -> int | None:
    """How many tokens the writer of lending ``nonce`` stamped; None if it did not."""
    return int(head[Field.NUM_TOKENS]) if int(head[Field.NONCE]) == nonce else None


@dataclass(frozen=True, slots=True)
class SlotRef:
    """What crosses a process boundary instead of the KV: which file, which request."""

    path: str
    capacity: int  # bytes of the file
    nonce: int  # the writer stamps it when done; the reader checks it

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "SlotRef":
        """Parse and check a reference: only this server's slot files are accepted."""
        try:
            fields = json.loads(text)
            ref = cls(path=str(fields["path"]), capacity=int(fields["capacity"]), nonce=int(fields["nonce"]))
        except (TypeError, ValueError, KeyError) as exc:
            raise ValueError(f"kv_slot is not a valid slot reference: {exc}") from None
        directory, name = os.path.split(ref.path)
        if (
            directory != shm.SHM_DIR
            or not name.startswith(shm.current_prefix())
            or not _SAFE_NAME.fullmatch(name)
            or "-slot-" not in name
        ):
            raise ValueError(f"kv_slot path {ref.path!r} is not a slot of this server")
        if ref.capacity <= HEADER_BYTES:
            raise ValueError(f"kv_slot capacity {ref.capacity} is too small")
        return ref


@dataclass(eq=False, slots=True)
class Slot:
    path: str
    capacity: int
    data: torch.Tensor = field(repr=False)  # [capacity] uint8, shared mapping
    nonce: int = 0

    @property
    def header(self) -> torch.Tensor:
        return header(self.data)

    def kv(self, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        return kv_view(self.data, dtype, shape)

    @property
    def ref(self) -> SlotRef:
        return SlotRef(self.path, self.capacity, self.nonce)

    def lend(self) -> SlotRef:
        """A reference for one writer: a fresh nonce, the old one cleared."""
        self.nonce = secrets.randbits(62) + 1
        self.header.zero_()
        return self.ref

    def complete(self, num_tokens: int) -> bool:
        """Whether the writer finished writing ``num_tokens`` tokens for this lending."""
        return written_tokens(self.header, self.nonce) == num_tokens

    def give_first_token(self, token: int) -> None:
        """An early load: prefill's first token, for the engine that waits on this slot."""
        self.header[Field.FIRST_TOKEN] = token + 1

    def abandon(self) -> None:
        """Nobody will wait for this lending any more: a worker waiting on it gives up."""
        self.header[Field.ABANDONED] = 1

    def stamp_written(self, num_tokens: int) -> None:
        """Mark the KV complete (a writer that is not a vLLM worker: a stub's copy)."""
        stamp(self.header, self.nonce, num_tokens)


def slot_bytes(kv_bytes: int) -> int:
    """The size class holding ``kv_bytes`` of KV after the header."""
    need = max(HEADER_BYTES + kv_bytes, MIN_SLOT_BYTES)
    return 1 << (need - 1).bit_length()


class SlotPool:
    """Slots owned by one process: free lists per size class, a cap on idle bytes."""

    def __init__(self, name: str, directory: str = shm.SHM_DIR, max_idle_bytes: int = DEFAULT_MAX_IDLE_BYTES):
        self._stem = shm.path(f"{name}-slot-{os.getpid()}-", directory)
        reclaim_orphans(shm.path(f"{name}-slot-", directory))
        self.max_idle_bytes = max_idle_bytes
        self._free: dict[int, list[Slot]] = defaultdict(list)
        self._idle_bytes = 0
        self._all: set[str] = set()
        self._seq = itertools.count()
        self._lock = threading.Lock()

    def acquire(self, kv_bytes: int) -> Slot:
        size = slot_bytes(kv_bytes)
        with self._lock:
            if self._free[size]:
                self._idle_bytes -= size
                return self._free[size].pop()
            # A random part: a client that may call prefill cannot name another request's slot.
            path = f"{self._stem}{next(self._seq)}-{secrets.token_hex(8)}"
            self._all.add(path)
        try:
            _allocate(path, size)
            return Slot(path, size, map_file(path, size))
        except BaseException:
            self._forget(path)
            raise

    def release(self, slot: Slot) -> None:
        """Return a slot that nobody reads or writes any more."""
        with self._lock:
            self._free[slot.capacity].append(slot)
            self._idle_bytes += slot.capacity
            evict = self._over_cap()
        for old in evict:
            self._forget(old.path)

    def discard(self, slot: Slot) -> None:
        """Drop a slot that another process may still touch."""
        self._forget(slot.path)

    def close(self) -> None:
        with self._lock:
            paths, self._all, self._free, self._idle_bytes = list(self._all), set(), defaultdict(list), 0
        for path in paths:
            _unlink(path)

    @property
    def size(self) -> int:
        return len(self._all)

    @property
    def idle_bytes(self) -> int:
        return self._idle_bytes

    def _over_cap(self) -> list[Slot]:
        evicted = []
        for size in sorted(self._free, reverse=True):  # the biggest go first
            while self._idle_bytes > self.max_idle_bytes and self._free[size]:
                evicted.append(self._free[size].pop(0))
                self._idle_bytes -= size
        return evicted

    def _forget(self, path: str) -> None:
        with self._lock:
            self._all.discard(path)
        _unlink(path)


def reclaim_orphans(stem: str) -> list[str]:
    """Unlink the slots ``<stem><pid>-<n>`` of owners that are no longer alive.

    A model instance that died (and is loaded again) leaves its slots behind;
    the next pool of the same name on the same server removes them.
    """
    removed = []
    for path in glob.glob(glob.escape(stem) + "*"):
        pid = path[len(stem) :].split("-", 1)[0]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            _unlink(path)
            removed.append(path)
    if removed:
        logger.info("reclaimed %d KV slot(s) of dead owners", len(removed))
    return removed


def _allocate(path: str, size: int) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        raise SlotError(
            f"cannot allocate a {size >> 20} MiB KV slot in {os.path.dirname(path)} ({exc.strerror}): "
            "/dev/shm is too small for the KV in flight"
        ) from None
    finally:
        os.close(fd)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class MappingCache:
    """A reader's or writer's mappings of slot files by name.

    Bounded in count and bytes, least recently used out; a mapping whose file
    was unlinked (a discarded slot) is dropped at the next miss, so its memory
    goes back to the system instead of staying pinned by this process.
    """

    def __init__(self, capacity: int = 64, max_bytes: int = 4 << 30, on_drop=None):
        self._maps: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._capacity = capacity
        self._max_bytes = max_bytes
        self._on_drop = on_drop  # called with a mapping before it is let go (e.g. to unregister it from CUDA)

    def _drop(self, path: str) -> None:
        flat = self._maps.pop(path)
        if self._on_drop is not None:
            self._on_drop(flat)

    def get(self, path: str, nbytes: int) -> torch.Tensor:
        flat = self._maps.get(path)
        if flat is None or flat.numel() < nbytes:
            self._drop_unlinked()
            if path in self._maps:  # too small: mapped again, larger
                self._drop(path)
            flat = map_file(path, nbytes)
            self._maps[path] = flat
            while len(self._maps) > 1 and (
                len(self._maps) > self._capacity or sum(m.numel() for m in self._maps.values()) > self._max_bytes
            ):
                self._drop(next(iter(self._maps)))
        self._maps.move_to_end(path)
        return flat

    def _drop_unlinked(self) -> None:
        for path in [p for p in self._maps if not os.path.exists(p)]:
            self._drop(path)
