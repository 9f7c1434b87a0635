"""Decode's text equals a single engine's, across the prefill/decode boundary."""

import random
from types import SimpleNamespace

import pytest
from vllm import SamplingParams
from vllm.v1.engine.detokenizer import IncrementalDetokenizer

from hetserve.text import Continuation, engine_params


@pytest.fixture(scope="module")
def tokenizer(model_path):
    from vllm.tokenizers import get_tokenizer

    return get_tokenizer(str(model_path))


def single_engine(tokenizer, prompt, outputs, params):
    """Text and tokens as one engine streams them, one token per step."""
    detok = IncrementalDetokenizer.from_new_request(
        tokenizer, SimpleNamespace(request_id="r", prompt_token_ids=prompt, prompt_embeds=None, sampling_params=params)
    )
    text, ids = "", []
    for i, token in enumerate(outputs):
        before = detok.num_output_tokens()
        stop = detok.update([token], stop_terminated=False)
        ids += detok.output_token_ids[before:]
        last = stop is not None or i == len(outputs) - 1
        text += detok.get_next_output_text(finished=last, delta=True)
        if stop is not None:
            break
    return text, ids


def split(tokenizer, prompt, outputs, params):
    """prefill's first token (a finished one-token request), then Continuation."""
    first_text, _ = single_engine(tokenizer, prompt, outputs[:1], params)
    cont = Continuation(tokenizer, "r", prompt, outputs[:1], params)
    text, ids = first_text, outputs[:1]
    for i, token in enumerate(outputs[1:]):
        delta = cont.update([token], stop_terminated=False, finished=i == len(outputs) - 2)
        text, ids = text + delta.text, ids + delta.token_ids
        if delta.stop_string is not None:
            break
    return text, ids


@pytest.mark.parametrize("seed", range(40))
def test_split_text_equals_single_engine(tokenizer, seed):
    rng = random.Random(seed)
    vocab = len(tokenizer)
    prompt = [rng.randrange(2, vocab) for _ in range(rng.randint(1, 30))]
    outputs = [rng.randrange(2, vocab) for _ in range(20)]
    stop = [tokenizer.decode(outputs[12:14])] if seed % 2 else None  # half the cases stop early
    params = SamplingParams(max_tokens=20, stop=stop)
    assert split(tokenizer, prompt, outputs, params) == single_engine(tokenizer, prompt, outputs, params)


def test_engine_copy_does_not_detokenize():
    params = SamplingParams(max_tokens=5, stop=["x"])
    engine = engine_params(params)
    assert (engine.detokenize, engine.stop) == (False, []) and params.stop == ["x"]
