"""vLLM's per-token logprobs as the JSON that Triton's vLLM backend sends.

One entry per generated token: ``{token_id: {"logprob", "rank",
"decoded_token"}}`` for the sampled token and the top-``logprobs`` ones.
"""

from __future__ import annotations

from typing import Any


def entries(logprobs, tokenizer=None) -> list[dict[str, Any]] | None:
    """vLLM's ``CompletionOutput.logprobs`` (per token: id -> Logprob) as JSON-ready dicts.

    An engine that does not detokenize (prefill) leaves ``decoded_token``
    empty; given its tokenizer, it is filled the way vLLM's own logprobs
    processor fills it.
    """
    if logprobs is None:
        return None
    out = []
    for position in logprobs:
        ids = list(position)
        names = [position[t].decoded_token for t in ids]
        if tokenizer is not None and None in names:
            from vllm.tokenizers.detokenizer_utils import convert_ids_list_to_tokens

            names = convert_ids_list_to_tokens(tokenizer, ids)
        out.append({
            str(t): {"logprob": position[t].logprob, "rank": position[t].rank, "decoded_token": name}
            for t, name in zip(ids, names)
        })
    return out


def logprob_of(entry: dict[str, Any], token_id: int) -> float:
    return float(entry[str(token_id)]["logprob"])
