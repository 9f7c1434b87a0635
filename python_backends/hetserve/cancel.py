"""Cancellation marks shared by the models of one server.

When a client cancels a request that ``llm`` has handed to ``prefill`` (a
BLS request), the prefill model must abort it. Triton 2.51 cannot cancel a BLS
request (``ResponseIterator.cancel`` came in 25.04). Rather than a second BLS
round trip (a "cancel" control request, a blocked thread in the BLS stub), the
mark travels beside Triton: an empty file per request id in a directory under
/dev/shm that prefill polls; the launcher removes it with the rest. Requests in
llm's own engine need none of this: llm holds the client's request and aborts
them itself.
"""

from __future__ import annotations

import hashlib
import os
import re

from hetserve import shm

_SAFE_ID = re.compile(r"[A-Za-z0-9_.-]{1,128}")


def check_request_id(request_id: str) -> str:
    if not _SAFE_ID.fullmatch(request_id) or request_id in (".", ".."):
        raise ValueError(f"request_id must be 1-128 characters of [A-Za-z0-9_.-], got {request_id!r}")
    return request_id


def attempt_id(request_id: str, attempt: int) -> str:
    """The id of a request's ``attempt``-th call to a prefill tier.

    Each call gets its own id, and so its own mark: llm marks a call it gives
    up on (a tier down or too slow), and the next tier, tried for the same
    request, must not read that mark as its own. Still a valid request id for
    the longest ids a client may send (a digest stands for the cut part).
    """
    suffix = f".p{attempt}"
    if len(request_id) + len(suffix) > 128:
        digest = hashlib.blake2b(request_id.encode("utf-8"), digest_size=8).hexdigest()
        request_id = f"{request_id[:100]}.{digest}"
    return check_request_id(request_id + suffix)


class CancelBoard:
    def __init__(self, directory: str | None = None):
        self.directory = directory or shm.path("cancel")
        os.makedirs(self.directory, exist_ok=True)

    def cancel(self, request_id: str) -> None:
        open(os.path.join(self.directory, check_request_id(request_id)), "wb").close()

    def cancelled(self) -> set[str]:
        """Every request id marked now (one directory read for all of them)."""
        try:
            return set(os.listdir(self.directory))
        except FileNotFoundError:
            return set()

    def clear(self, request_id: str) -> None:
        try:
            os.unlink(os.path.join(self.directory, check_request_id(request_id)))
        except FileNotFoundError:
            pass
