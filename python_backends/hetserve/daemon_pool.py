"""Daemon threads for blocking calls that may never return, reused while idle.

``llm`` runs each BLS request to prefill in a thread: ``exec`` and its
response iterator block, and if prefill's stub dies they block for ever
(Triton 2.51 ends no dead stub's requests). A thread per call paid for its
start on the engine's event loop (the clone and a fresh stack: 10% of the
loop's time holding the GIL under 64 requests, py-spy ``--gil``). The
standard ThreadPoolExecutor would reuse threads, but it bounds them (stuck
calls would starve it) and joins them at interpreter exit (a stuck call
would hang the stub's exit). Here a call takes an idle thread or starts one;
threads are daemons and are never bounded, as before.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Callable

logger = logging.getLogger(__name__)


class DaemonPool:
    def __init__(self, name: str):
        self._name = name
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0  # threads waiting for a call, not yet promised one
        self.started = 0

    def run(self, fn: Callable[[], None]) -> None:
        """Call ``fn()`` on a thread of the pool (what it raises is logged; hand results back yourself)."""
        with self._lock:
            start = self._idle == 0
            if start:
                self.started += 1
            else:
                self._idle -= 1
        self._calls.put(fn)
        if start:
            threading.Thread(target=self._work, name=f"{self._name}-{self.started}", daemon=True).start()

    def _work(self) -> None:
        while True:
            fn = self._calls.get()
            try:
                fn()
            except BaseException:  # noqa: BLE001 - the thread serves the next call
                logger.exception("%s: a call failed", self._name)
            fn = None  # an idle thread must not keep the last call's request and responses alive
            with self._lock:
                self._idle += 1
