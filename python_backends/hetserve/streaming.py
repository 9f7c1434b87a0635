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

The stub coalesces tokens into responses; vLLM's output processor (in the
stub's process, AsyncLLM) holds them back as well (``hold_in_engine``), so
that the outputs between responses are not made at all: a RequestOutput, a
queue hand-off and a pass of the stub's loop per token and stream.
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


def hold_in_engine(processor, request_id: str, interval: int) -> None:
    """Set a running request's stream interval in vLLM's output processor.

    vLLM fixes a request's interval when it starts (the engine's
    ``stream_interval``, raised by ``SamplingParams.stream_interval``); under
    ``auto`` the load changes while a request runs, so ``llm`` sets it at each
    of the request's outputs. vLLM counts what it has sent only while the
    interval is above 1: going up from 1, every token made so far went out
    in its own output and is marked sent; going back to 1 waits until nothing
    is held, or the held tokens would never be sent. Requests with n > 1
    (several internal requests) are left as they are. ``processor`` is the
    AsyncLLM's ``output_processor`` (vLLM 0.32).
    """
    internal = processor.external_req_ids.get(request_id)
    state = processor.request_states.get(internal[0]) if internal and len(internal) == 1 else None
    if state is None or state.parent_req is not None or state.stream_interval == interval:
        return
    made = state.detokenizer.num_output_tokens()
    if state.stream_interval == 1:
        state.sent_tokens_offset = made
    elif interval == 1 and made != state.sent_tokens_offset:
        return
    state.stream_interval = interval
