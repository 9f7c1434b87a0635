"""How many tokens ``llm`` puts in one streamed response (config.pbtxt ``stream_interval``).

Each streamed response costs CPU in the stub, in tritonserver (a gRPC
message) and in the client, whatever it carries. Under many streams that
per-response work competes with the decode engine for the same cores, so
responses carrying one token each cost throughput. ``auto`` sends every
token while few requests run (inter-token latency at low concurrency is what
those clients see) and, as requests grow, several tokens per response: at
each engine output ``llm`` sends what a stream holds once it holds as many
tokens as the interval for the requests in flight at that moment (the first
token and the last response always go at once). An integer fixes the
interval for every stream; a client's own ``sampling_parameters.stream_interval``
(vLLM's) can only raise it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

AUTO = "auto"
# auto: one more token per response for every this many requests in flight,
# up to MAX_AUTO tokens.
STREAMS_PER_TOKEN = 8
MAX_AUTO = 16


@dataclass(frozen=True)
class StreamInterval:
    fixed: int | None = None  # None: auto

    @classmethod
    def parse(cls, value: str) -> "StreamInterval":
        text = value.strip().lower()
        if text == AUTO:
            return cls()
        try:
            fixed = int(text)
        except ValueError:
            fixed = 0
        if fixed < 1:
            raise ValueError(f"stream_interval must be {AUTO!r} or a whole number of tokens >= 1, got {value!r}")
        return cls(fixed)

    def interval(self, in_flight: int) -> int:
        """Tokens per streamed response while ``in_flight`` requests are in the model."""
        if self.fixed is not None:
            return self.fixed
        return min(MAX_AUTO, max(1, math.ceil(in_flight / STREAMS_PER_TOKEN)))
