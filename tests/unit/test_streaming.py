"""stream_interval (config.pbtxt): parsing and the auto policy."""

import pytest

from hetserve.streaming import MAX_AUTO, STREAMS_PER_TOKEN, StreamInterval


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
