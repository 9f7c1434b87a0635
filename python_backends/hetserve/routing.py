"""Where ``llm`` prefills a prompt: the routing policy, apart from Triton.

``llm``'s ``prefill_model`` parameter lists the prefill tiers, each with the
shortest prompt it takes: ``"prefill"`` (one tier, from
``remote_prefill_min_tokens``), ``"prefill:32, prefill_cpu:512"``, or ``""``
(none: every prompt prefilled locally). Per
request, the tiers whose minimum the prompt reaches and which are ready are
tried least loaded first (requests in flight and queued over the tier's
limit; the listed order breaks ties): the first, then one retry on the next
if the first fails, then llm's own engine (local prefill, no transfer).

A tier on another Triton server is named by its gRPC address:
``"grpc://10.0.0.7:8001/prefill:512"`` (the KV then comes back as the
interchange tensor over gRPC).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from hetserve.admission import Admission

ATTEMPTS = 2  # one tier, then one retry on another

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


def order(tiers: list[Tier]) -> list[Tier]:
    """Ready tiers, least loaded first, at most ATTEMPTS of them."""
    ready = [t for t in tiers if t.ready]
    return sorted(ready, key=lambda t: t.admission.load())[:ATTEMPTS]  # sorted() is stable: listed order on ties
