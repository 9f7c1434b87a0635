"""Admission control for one tier: requests and KV bytes in flight, a bounded queue.

A request that fits goes in at once. One that does not waits in FIFO order, at
most ``max_queued`` of them and each at most ``queue_timeout_s``; beyond that
it is refused with ``Overloaded``, an error that says which limit was hit.
Used on one event loop only (the engine loop of a model), so it takes no lock.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass


class Overloaded(Exception):
    """The tier is full and its queue too; the message names the limits."""


@dataclass(slots=True, eq=False)
class Ticket:
    nbytes: int
    released: bool = False


class Admission:
    def __init__(
        self,
        name: str,
        max_requests: int,
        max_queued: int,
        queue_timeout_s: float,
        max_bytes: int | None = None,
    ):
        if max_requests < 1 or max_queued < 0 or queue_timeout_s < 0 or (max_bytes is not None and max_bytes < 1):
            raise ValueError(f"{name}: admission limits must be positive")
        self.name = name
        self.max_requests = max_requests
        self.max_queued = max_queued
        self.queue_timeout_s = queue_timeout_s
        self.max_bytes = max_bytes
        self.requests = 0
        self.bytes = 0
        self._waiting: deque[tuple[int, asyncio.Future]] = deque()
        self.on_change = None  # called with (requests, queued) after each change, for metrics

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(self.requests, len(self._waiting))

    @property
    def queued(self) -> int:
        return len(self._waiting)

    def load(self) -> float:
        """How full the tier is, 0..1 (and more while requests queue)."""
        return (self.requests + len(self._waiting)) / self.max_requests

    def _fits(self, nbytes: int) -> bool:
        if self.requests >= self.max_requests:
            return False
        if self.max_bytes is None or self.requests == 0:  # one request larger than the cap still runs alone
            return True
        return self.bytes + nbytes <= self.max_bytes

    def _admit(self, nbytes: int) -> Ticket:
        self.requests += 1
        self.bytes += nbytes
        self._changed()
        return Ticket(nbytes)

    async def enter(self, nbytes: int = 0) -> Ticket:
        if not self._waiting and self._fits(nbytes):
            return self._admit(nbytes)
        if len(self._waiting) >= self.max_queued:
            raise Overloaded(self._why(f"{len(self._waiting)} queued (the most it queues)"))
        waiter = asyncio.get_running_loop().create_future()
        entry = (nbytes, waiter)
        self._waiting.append(entry)
        self._changed()
        started = time.monotonic()
        try:
            return await asyncio.wait_for(asyncio.shield(waiter), self.queue_timeout_s)
        except asyncio.TimeoutError:
            if waiter.done() and not waiter.cancelled():  # admitted just as the wait ran out
                return waiter.result()
            raise Overloaded(self._why(f"it waited {time.monotonic() - started:.1f} s in the queue")) from None
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():  # admitted, but cancelled meanwhile
                self.release(waiter.result())
            raise
        finally:
            if not waiter.done():
                waiter.cancel()
            try:
                self._waiting.remove(entry)
                self._changed()
            except ValueError:
                pass

    def release(self, ticket: Ticket) -> None:
        if ticket.released:
            return
        ticket.released = True
        self.requests -= 1
        self.bytes -= ticket.nbytes
        self._changed()
        while self._waiting:
            nbytes, waiter = self._waiting[0]
            if waiter.done():
                self._waiting.popleft()
                continue
            if not self._fits(nbytes):
                break
            self._waiting.popleft()
            waiter.set_result(self._admit(nbytes))

    def _why(self, what: str) -> str:
        limit = f"{self.requests} of {self.max_requests} requests in flight"
        if self.max_bytes is not None:
            limit += f", {self.bytes >> 20} of {self.max_bytes >> 20} MiB of KV"
        return f"{self.name} is overloaded: {limit}, and {what}"
