"""Detokenizing tokens that an engine did not generate itself, exactly as a single engine would.

Two places need it. ``llm`` sends prefill's first token before its own engine
has produced anything, so it makes that token's text here. And when a client
sends KV plus tokens already generated (``input_ids``), the engine would take
those tokens as prompt, which differs from a single engine at the boundary (a
token ending inside a UTF-8 character made vLLM emit the whole prompt text);
that engine runs with ``detokenize=False`` and this module turns its tokens
into text. Both drive vLLM's own incremental detokenizer as a single engine
does: primed with the prompt, fed every generated token from the first. Stop
strings are checked by the same code, with the same hold-back of text that may
start one.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

from vllm import SamplingParams
from vllm.v1.engine.detokenizer import IncrementalDetokenizer


@dataclass(slots=True)
class Delta:
    token_ids: list[int]
    text: str
    stop_string: str | None  # set when a stop string ended the generation


class Continuation:
    """Text deltas for tokens generated after ``prompt_ids`` + ``generated``."""

    def __init__(self, tokenizer, request_id: str, prompt_ids: list[int], generated: list[int], params: SamplingParams):
        request = SimpleNamespace(
            request_id=request_id, prompt_token_ids=prompt_ids, prompt_embeds=None, sampling_params=params
        )
        self._detok = IncrementalDetokenizer.from_new_request(tokenizer, request)
        self._detok.update(generated, stop_terminated=False)
        self._detok.get_next_output_text(finished=True, delta=True)  # the client has these already

    def update(self, new_ids: list[int], stop_terminated: bool, finished: bool) -> Delta:
        """The part of ``new_ids`` to emit and its text."""
        before = self._detok.num_output_tokens()
        stop = self._detok.update(new_ids, stop_terminated)
        kept = self._detok.output_token_ids[before:]
        text = self._detok.get_next_output_text(finished=finished or stop is not None, delta=True)
        return Delta(kept, text, stop)


def engine_params(params: SamplingParams) -> SamplingParams:
    """An engine copy that does not detokenize (so stop strings are checked here, not there)."""
    engine = params.clone()
    engine.stop = []
    engine.detokenize = False
    return engine
