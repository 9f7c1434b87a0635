"""hetserve_client reads the generate endpoint's JSON as Triton writes it."""

from hetserve_client.client import completion_of


def test_one_generated_token_is_a_list_of_one():
    # Triton's generate endpoint writes a one-element output as a bare value.
    out = {"text_output": " ugly", "output_ids": 514, "finish_reason": "length", "num_input_tokens": 5, "num_output_tokens": 1}
    done = completion_of(out)
    assert done.token_ids == [514]
    assert (done.text, done.finish_reason, done.num_input_tokens, done.num_output_tokens) == (" ugly", "length", 5, 1)


def test_several_tokens_and_listed_fields():
    out = {"text_output": ["a", "b"], "output_ids": [1, 2, 3], "finish_reason": ["stop"], "num_output_tokens": [3]}
    done = completion_of(out)
    assert done.token_ids == [1, 2, 3]
    assert (done.text, done.finish_reason, done.num_output_tokens) == ("ab", "stop", 3)
