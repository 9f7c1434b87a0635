"""A vLLM logits processor that makes a request's first generated token a given one.

Why: the split must sample exactly like one engine. Prefill samples the first
token; if the decode engine took that token as part of its prompt, its seeded
generator would restart, penalties would not count it, and a grammar would
not have consumed it. Instead the decode engine gets the *prompt* (KV loaded
for all but its last token, which it recomputes; the connector then puts
prefill's KV for that token back) and generates from the first
token on, like a single engine, with this processor forcing that first step to
prefill's token: every other logit is -inf, so greedy, seeded sampling and any
grammar all pick it, and the sampler's random stream, penalty counts and
grammar state advance exactly as in a single engine. From the second step on,
the request is untouched.

A request asks for it with ``SamplingParams.extra_args[FIRST_TOKEN_KEY] = id``,
or, loaded early (kv/early.py: the engine had the request before prefill had
sampled), gets the token its worker read from the slot's header. The consumer
engine loads the class by name (engine.py). Plain vLLM: no Triton.
"""

from __future__ import annotations

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from hetserve.connector_params import EARLY_WAIT_KEY, PARAMS_KEY

FIRST_TOKEN_KEY = "hetserve_first_token"


class ForceFirstToken(LogitsProcessor):
    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        # batch row -> (the token to force, the request's live output token list)
        self._rows: dict[int, tuple[int, list[int]]] = {}

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        token = (sampling_params.extra_args or {}).get(FIRST_TOKEN_KEY)
        if token is not None and (not isinstance(token, int) or token < 0):
            raise ValueError(f"{FIRST_TOKEN_KEY} must be a token id, got {token!r}")

    def is_argmax_invariant(self) -> bool:
        return False  # it decides the argmax

    @staticmethod
    def _new(params: SamplingParams, _prompt: list[int] | None, output: list[int]):
        if output:
            return None
        extra = params.extra_args or {}
        token = extra.get(FIRST_TOKEN_KEY)
        if token is None:
            token = _early_token(extra)
        return None if token is None else (token, output)

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self._rows, batch_update, self._new)
        for row in [row for row, (_, output) in self._rows.items() if output]:
            del self._rows[row]  # its first token is out: leave it alone

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        # logits: [batch, vocab]
        for row, (token, _) in self._rows.items():
            logits[row].fill_(float("-inf"))
            logits[row, token] = 0.0  # finite even where a mask had ruled it out
        return logits


def _early_token(extra: dict) -> int | None:
    """The first token of an early load, left by this worker's connector (None: not loaded early)."""
    from hetserve.kv.early import FIRST_TOKENS

    params = (extra.get("kv_transfer_params") or {}).get(PARAMS_KEY) or {}
    if EARLY_WAIT_KEY not in params:
        return None
    return FIRST_TOKENS.pop((params["slot"], int(params["nonce"])), None)
