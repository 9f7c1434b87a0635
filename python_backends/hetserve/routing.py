"""Where ``llm`` prefills a prompt: the routing policy, apart from Triton.

``llm``'s ``prefill_model`` parameter lists the prefill tiers, each with the
shortest prompt it takes: ``"prefill"`` (one tier, from
``remote_prefill_min_tokens``), or ``"prefill:32, prefill_cpu:512"``. Per
request, the tiers whose minimum the prompt reaches and which are ready are
tried least loaded first (requests in flight and queued over the tier's
limit; the listed order breaks ties): the first, then one retry on the next
if the first fails, then llm's own engine (local prefill, no transfer).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from hetserve.admission import Admission

ATTEMPTS = 2  # one tier, then one retry on another

_ITEM = re.compile(r"\s*([A-Za-z0-9_.-]+)\s*(?::\s*(\d+)\s*)?")


@dataclass(slots=True, eq=False)
class Tier:
    model: str
    min_tokens: int
    admission: Admission
    ready: bool = True
    checked_at: float = float("-inf")


def parse_tiers(spec: str, default_min_tokens: int, admission: Callable[[str], Admission]) -> list[Tier]:
    """``"a, b:512"`` -> tiers a (from ``default_min_tokens``) and b (from 512 tokens)."""
    tiers = []
    for item in spec.split(","):
        match = _ITEM.fullmatch(item)
        if not match:
            raise ValueError(f"prefill_model: {item.strip()!r} is not MODEL or MODEL:MIN_TOKENS")
        model, minimum = match.group(1), match.group(2)
        if any(t.model == model for t in tiers):
            raise ValueError(f"prefill_model: {model} is listed twice")
        tiers.append(Tier(model, int(minimum) if minimum else default_min_tokens, admission(model)))
    if not tiers:
        raise ValueError("prefill_model names no model")
    return tiers


def eligible(tiers: list[Tier], num_tokens: int) -> list[Tier]:
    """The tiers that take a prompt this long, before readiness: the ones to ask."""
    return [t for t in tiers if num_tokens >= t.min_tokens]


def order(tiers: list[Tier]) -> list[Tier]:
    """Ready tiers, least loaded first, at most ATTEMPTS of them."""
    ready = [t for t in tiers if t.ready]
    return sorted(ready, key=lambda t: t.admission.load())[:ATTEMPTS]  # sorted() is stable: listed order on ties
