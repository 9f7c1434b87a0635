"""sampling_parameters: clear errors, and the split of a request in two halves."""

import pytest

from hetserve.sampling import after_first_token, parse_json, to_sampling_params


@pytest.mark.parametrize("raw, message", [("{bad", "not valid JSON"), ("[1]", "JSON object"), (b"\xff", "not valid JSON")])
def test_malformed_json(raw, message):
    with pytest.raises(ValueError, match=message):
        parse_json(raw)


def test_absent_is_empty():
    assert parse_json(None) == {} and parse_json("") == {}


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"max_tokens": -1}, "max_tokens"),
        ({"temperature": -0.5}, "temperature"),
        ({"bogus": 1, "also": 2}, r"unknown field\(s\) \['also', 'bogus'\]"),
        ({"output_kind": 1}, "unknown field"),
        ({"n": 2}, "n=1"),
        ({"max_tokens": "many"}, "invalid sampling_parameters"),
    ],
)
def test_invalid_fields_name_the_problem(fields, message):
    with pytest.raises(ValueError, match=message):
        to_sampling_params(fields)


def test_valid_fields_reach_vllm():
    params = to_sampling_params({"max_tokens": 7, "temperature": 0, "ignore_eos": True, "stop": ["x"]})
    assert (params.max_tokens, params.temperature, params.ignore_eos, params.stop) == (7, 0, True, ["x"])


def test_the_rest_continues_after_one_token():
    rest = after_first_token(to_sampling_params({"max_tokens": 10, "min_tokens": 3, "temperature": 0}))
    assert (rest.max_tokens, rest.min_tokens, rest.temperature) == (9, 2, 0)
    assert after_first_token(to_sampling_params({"max_tokens": None})).max_tokens is None
    assert after_first_token(to_sampling_params({})).min_tokens == 0
