"""sampling_parameters: clear errors, and the coercions clients rely on."""

import re

import pytest

from hetserve.sampling import parse_json, to_sampling_params


@pytest.mark.parametrize("raw, message", [("{bad", "not valid JSON"), ("[1]", "JSON object, got \\[1\\]"), ("null", "JSON object, got null"), (b"\xff", "not valid JSON")])
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
        ({"max_tokens": "many"}, "max_tokens must be int, got 'many'"),
        ({"max_tokens": "1.5"}, "max_tokens must be int"),
        ({"ignore_eos": "maybe"}, "ignore_eos must be bool"),
        ({"temperature": [1]}, "temperature"),
        ({"logit_bias": {"x": 1}}, "logit_bias must map token ids"),
        ({"structured_outputs": {"jsn": {}}}, "structured_outputs"),
    ],
)
def test_invalid_fields_name_the_problem(fields, message):
    with pytest.raises(ValueError, match=message):
        to_sampling_params(fields)


def test_valid_fields_reach_vllm():
    params = to_sampling_params({"max_tokens": 7, "temperature": 0, "ignore_eos": True, "stop": ["x"]})
    assert (params.max_tokens, params.temperature, params.ignore_eos, params.stop) == (7, 0, True, ["x"])



def test_numbers_and_booleans_as_strings_are_accepted():
    """genai-perf's vLLM converter sends numbers as strings; Triton's vLLM backend accepts them."""
    params = to_sampling_params({"max_tokens": "100", "min_tokens": "100", "temperature": "0.5", "ignore_eos": "true"})
    assert (params.max_tokens, params.min_tokens, params.temperature, params.ignore_eos) == (100, 100, 0.5, True)
    assert to_sampling_params({"seed": "7", "ignore_eos": "False"}).seed == 7


def test_logit_bias_keys_and_structured_outputs_arrive_typed():
    params = to_sampling_params({"logit_bias": {"5": 2.5}, "structured_outputs": {"choice": ["yes", "no"]}})
    assert params.logit_bias == {5: 2.5}
    assert params.structured_outputs.choice == ["yes", "no"]


def test_deep_or_huge_json_is_refused():
    with pytest.raises(ValueError, match="nested too deeply"):
        parse_json("[" * 100000)
    with pytest.raises(ValueError, match="bytes, more than"):
        parse_json('{"stop": "' + "x" * (2 << 20) + '"}')


@pytest.mark.parametrize("fields, where", [
    ({"logit_bias": [1, 2]}, "logit_bias"),
    ({"logit_bias": 3}, "logit_bias"),
    ({"seed": 1.5}, "seed"),
    ({"bad_words": [1]}, "bad_words"),
    ({"allowed_token_ids": {"a": 1}}, "allowed_token_ids"),
])
def test_wrong_types_are_refused_before_they_reach_the_engine_core(fields, where):
    # vLLM's engine core would fail to decode these in its input thread, which then dies.
    with pytest.raises(ValueError, match=rf"sampling_parameters: .*\b{re.escape(where)}\b"):
        to_sampling_params({"max_tokens": 4, **fields})


@pytest.mark.parametrize("fields, message", [
    # Found by probing a running server: each gave an error that named no field.
    ({"max_tokens": 10**30}, "max_tokens is out of range"),  # was an OverflowError from msgpack
    ({"seed": 2**64}, "seed is out of range"),
    ({"stop_token_ids": [2**70]}, "stop_token_ids must be a list of integers"),
    ({"stop": {"a": 1}}, "stop must not be an object"),  # was vLLM's bare AssertionError
    ({"stop": [1]}, "stop must be a list of strings, got 1"),  # was "object of type 'int' has no len()"
    ({"stop": [None]}, "stop must be a list of strings, got None"),
    ({"bad_words": "than"}, "bad_words must be a list, got a string"),  # was accepted as a list of letters
    ({"allowed_token_ids": [1, True]}, "allowed_token_ids must be a list of integers, got True"),
    ({"stop": 5}, "stop must be a list or a string, got 5"),  # was "'int' object is not iterable"
    ({"logit_bias": 3}, "logit_bias must be an object, got 3"),
    ({"structured_outputs": 2.5}, "structured_outputs must be an object, got 2.5"),
])
def test_values_of_the_wrong_kind_are_refused_with_the_field_named(fields, message):
    with pytest.raises(ValueError, match=re.escape(f"sampling_parameters: {message}")):
        to_sampling_params({"max_tokens": 4, **fields})


def test_null_means_the_default_where_a_field_takes_no_null():
    params = to_sampling_params({"max_tokens": 4, "temperature": None, "top_p": None, "top_k": None, "seed": None})
    default = to_sampling_params({"max_tokens": 4})
    assert (params.temperature, params.top_p, params.top_k, params.seed) == (default.temperature, default.top_p, default.top_k, None)


# ------------------------------------------- a request's own parameters (Triton's vLLM backend fallback)


def test_request_parameters_are_the_sampling_parameters_without_the_input():
    from hetserve.sampling import from_request_parameters

    raw, stream = from_request_parameters('{"temperature": 0, "max_tokens": 3}', None)
    assert parse_json(raw) == {"temperature": 0, "max_tokens": 3} and stream is None
    assert to_sampling_params(parse_json(raw)).max_tokens == 3
    assert from_request_parameters("{}", True) == ("", True)
    assert from_request_parameters('{"triton_enable_empty_final_response": true}', None) == ("", None)


def test_request_parameters_stream_stands_for_the_stream_input():
    from hetserve.sampling import from_request_parameters

    assert from_request_parameters('{"stream": false, "max_tokens": 2}', None) == ('{"max_tokens": 2}', False)
    assert from_request_parameters('{"stream": "true"}', None) == ("", True)
    assert from_request_parameters('{"stream": true}', True) == ("", True)
    assert from_request_parameters('{"stream": 1}', None) == ("", True)  # an int64 gRPC parameter
    assert from_request_parameters('{"stream": null, "seed": 3}', False) == ('{"seed": 3}', False)
    with pytest.raises(ValueError, match="the stream input is False but parameters.stream is True"):
        from_request_parameters('{"stream": true}', False)
    with pytest.raises(ValueError, match="stream must be a boolean"):
        from_request_parameters('{"stream": 3}', None)


def test_request_parameters_are_checked_as_sampling_parameters_are():
    from hetserve.sampling import from_request_parameters

    raw, _ = from_request_parameters('{"bogus": 1}', None)
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['bogus'\]"):
        to_sampling_params(parse_json(raw))
    raw, _ = from_request_parameters('{"max_tokens": -3}', None)
    with pytest.raises(ValueError, match="max_tokens"):
        to_sampling_params(parse_json(raw))
