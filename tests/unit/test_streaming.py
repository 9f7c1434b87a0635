"""stream_interval (config.pbtxt): parsing and the auto policy."""

import pytest

from hetserve.streaming import MAX_AUTO, STREAMS_PER_TOKEN, StreamInterval, hold_in_engine


def test_auto_sends_every_token_at_low_load_and_coalesces_as_streams_grow():
    auto = StreamInterval.parse("auto")
    assert [auto.interval(n) for n in (0, 1, STREAMS_PER_TOKEN)] == [1, 1, 1]
    assert auto.interval(STREAMS_PER_TOKEN + 1) == 2
    assert auto.interval(64) == 64 // STREAMS_PER_TOKEN
    assert auto.interval(10_000) == MAX_AUTO
    steps = [auto.interval(n) for n in range(1, 1000)]
    assert steps == sorted(steps)  # never fewer tokens per response under more load


def test_a_number_fixes_it():
    assert StreamInterval.parse(" 4 ").interval(1) == 4
    assert StreamInterval.parse("1").interval(1000) == 1


@pytest.mark.parametrize("bad", ["0", "-2", "1.5", "", "fast"])
def test_bad_values_name_the_parameter(bad):
    with pytest.raises(ValueError, match="stream_interval must be 'auto' or a whole number"):
        StreamInterval.parse(bad)


# ------------------------------------------------ hold_in_engine, on vLLM's own OutputProcessor


def _processor(request_id: str, client_interval: int | None = None):
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine import EngineCoreRequest
    from vllm.v1.engine.output_processor import OutputProcessor

    processor = OutputProcessor(None, log_stats=False)  # the stub's AsyncLLM: stream_interval 1
    params = SamplingParams(max_tokens=100, output_kind=RequestOutputKind.DELTA, stream_interval=client_interval)
    request = EngineCoreRequest(
        request_id=f"{request_id}-internal", prompt_token_ids=[1, 2, 3], mm_features=None, sampling_params=params,
        pooling_params=None, arrival_time=0.0, lora_request=None, cache_salt=None, data_parallel_rank=None,
        external_req_id=request_id,
    )
    processor.add_request(request, None)
    return processor


def _run(processor, request_id: str, steps: list[list[int]], intervals) -> list[list[int]]:
    """Feed the engine's steps; after each, set the interval the load asks for; the outputs' token ids."""
    from vllm.v1.engine import EngineCoreOutput, FinishReason

    sent = []
    for i, (tokens, interval) in enumerate(zip(steps, intervals)):
        last = i == len(steps) - 1
        out = EngineCoreOutput(f"{request_id}-internal", tokens, finish_reason=FinishReason.LENGTH if last else None)
        for request_output in processor.process_outputs([out]).request_outputs:
            sent.append(list(request_output.outputs[0].token_ids))
        if not last:
            hold_in_engine(processor, request_id, interval)
    return sent


def test_held_in_engine_every_token_goes_out_once_in_order_whatever_the_load_does():
    import random

    for seed in range(40):
        rng = random.Random(seed)
        steps = [[rng.randrange(1000) for _ in range(rng.choice((1, 1, 1, 2)))] for _ in range(rng.randint(1, 60))]
        intervals = [rng.choice((1, 1, 2, 3, 8, 16)) for _ in steps]
        sent = _run(_processor("r"), "r", steps, intervals)
        assert [t for out in sent for t in out] == [t for step in steps for t in step], seed
        assert all(sent), seed  # no empty output


def test_held_in_engine_raised_interval_coalesces_and_lowered_one_sends_each_token():
    steps = [[t] for t in range(30)]
    intervals = [1] * 3 + [8] * 16 + [1] * 11  # each set after its step: 8 from the 5th token, 1 from the 21st
    sent = _run(_processor("r"), "r", steps, intervals)
    sizes = [len(out) for out in sent]
    assert sizes[:4] == [1, 1, 1, 1]  # one output per token while the load asks for 1
    assert sizes[4:6] == [8, 8]  # then one per 8 tokens
    assert sizes[6:] == [1] * 10  # nothing held after the second 8: back to one each
    assert sum(sizes) == 30


def test_held_in_engine_leaves_unknown_requests_alone():
    processor = _processor("r")
    hold_in_engine(processor, "other", 8)  # no such request: nothing happens
    assert processor.request_states["r-internal"].stream_interval == 1


def test_held_in_engine_lowering_to_one_waits_until_nothing_is_held():
    processor = _processor("r")
    sent = _run(processor, "r", [[1], [2], [3]], [4, 4, 4])  # 1 at once, then 2 and 3 held (the last step ends it)
    state = processor.request_states.get("r-internal")
    assert state is None and sent == [[1], [2, 3]]  # finished: the held tokens went out with the end
    processor = _processor("s")
    sent = _run(processor, "s", [[1], [2], [3], [4], [5]], [4, 1, 1, 1, 1])
    assert sent == [[1], [2, 3, 4, 5]]  # held 2 (then 3, 4): lowering refused until the end sent them all
