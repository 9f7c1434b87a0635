"""Where ``llm`` prefills a prompt: the routing policy, apart from Triton.

``llm``'s ``prefill_model`` parameter lists the prefill tiers, each with the
shortest prompt it takes: ``"prefill"`` (one tier, from
``remote_prefill_min_tokens``), ``"prefill:32, prefill_cpu:512"``, or ``""``
(none: every prompt prefilled locally). Per
request, the tiers whose minimum the prompt reaches and which are ready are
tried least loaded first (requests in flight and queued over the tier's
limit; the listed order breaks ties): the first, then one retry on the next
if the first fails, then llm's own engine (local prefill, no transfer).
A tier that lets a request wait out ``prefill_timeout_s`` is left alone for a
while (``Tier.timed_out``), as a dead one is while it reads not ready.

A tier on another Triton server is named by its gRPC address:
``"grpc://10.0.0.7:8001/prefill:512"`` (the KV then comes back as the
interchange tensor over gRPC).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Callable

from hetserve.admission import Admission

ATTEMPTS = 2  # one tier, then one retry on another
# A tier that did not answer in prefill_timeout_s (hung, not dead: its model
# still reads ready) is left alone this long, doubled at each further
# timeout up to QUIET_MAX_S; then one request tries it while the rest go
# elsewhere, and an answer ends it.
QUIET_S = 5.0
QUIET_MAX_S = 120.0

_ITEM = re.compile(r"\s*(?:grpc://([A-Za-z0-9_.\[\]:-]+)/)?([A-Za-z0-9_.-]+)\s*(?::\s*(\d+)\s*)?")


@dataclass(slots=True, eq=False)
class Tier:
    model: str
    min_tokens: int
    admission: Admission
    url: str | None = None  # gRPC address of another Triton server; None: this one (BLS)
    ready: bool = True
    checked_at: float = float("-inf")
    client: object = None  # the remote tier's gRPC client, made in the engine's loop
    timeouts: int = 0  # timeouts in a row (requests sent after the last one seen)
    last_timeout: float = float("-inf")
    quiet_until: float = float("-inf")  # no requests before then

    def timed_out(self, sent_at: float, now: float) -> float:
        """A request sent at ``sent_at`` got no answer: how long the tier is now left alone (0: counted already).

        Requests sent before the last timeout was seen were sent to the same
        hang; they do not make the wait longer.
        """
        if sent_at < self.last_timeout:
            return 0.0
        self.timeouts += 1
        self.last_timeout = now
        quiet = min(QUIET_S * 2 ** min(self.timeouts - 1, 16), QUIET_MAX_S)
        self.quiet_until = now + quiet
        return quiet

    def usable(self, now: float) -> bool:
        return self.ready and self.quiet_until <= now

    def trying(self, now: float, for_s: float) -> bool:
        """A request goes to this tier; True if it is the one probe after timeouts (the others are kept off meanwhile)."""
        if not self.timeouts:
            return False
        self.quiet_until = max(self.quiet_until, now + for_s)
        return True

    def tried(self) -> None:
        """The probe ended otherwise than by a timeout (an error, a cancellation): let the next request try."""
        if self.timeouts:
            self.quiet_until = min(self.quiet_until, time.monotonic())

    def answered(self) -> None:
        self.timeouts, self.quiet_until, self.last_timeout = 0, float("-inf"), float("-inf")

    @property
    def name(self) -> str:
        """How logs, metrics and errors name the tier: ``prefill`` or ``grpc://host:port/prefill``."""
        return self.model if self.url is None else f"grpc://{self.url}/{self.model}"


def parse_tiers(spec: str, default_min_tokens: int, admission: Callable[[str], Admission]) -> list[Tier]:
    """``"a, b:512"`` -> tiers a (from ``default_min_tokens``) and b (from 512 tokens).

    ``admission`` makes a tier's admission control from the tier's name.
    """
    tiers = []
    if not spec.strip():
        return tiers  # no prefill tier: every prompt is prefilled by llm's own engine
    for item in spec.split(","):
        match = _ITEM.fullmatch(item)
        if not match:
            raise ValueError(
                f"prefill_model: {item.strip()!r} is not MODEL, MODEL:MIN_TOKENS or grpc://HOST:PORT/MODEL[:MIN_TOKENS]"
            )
        url, model, minimum = match.groups()
        tier = Tier(model, int(minimum) if minimum else default_min_tokens, None, url)
        if any(t.name == tier.name for t in tiers):
            raise ValueError(f"prefill_model: {tier.name} is listed twice")
        tier.admission = admission(tier.name)
        tiers.append(tier)
    return tiers


def eligible(tiers: list[Tier], num_tokens: int) -> list[Tier]:
    """The tiers that take a prompt this long, before readiness: the ones to ask."""
    return [t for t in tiers if num_tokens >= t.min_tokens]


def order(tiers: list[Tier], now: float | None = None) -> list[Tier]:
    """Ready tiers not left alone at ``now`` (default: time.monotonic()), least loaded first, at most ATTEMPTS of them."""
    now = time.monotonic() if now is None else now
    ready = [t for t in tiers if t.usable(now)]
    return sorted(ready, key=lambda t: t.admission.load())[:ATTEMPTS]  # sorted() is stable: listed order on ties
