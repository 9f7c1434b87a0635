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


def test_generate_against_no_server_says_so_without_a_traceback(capsys):
    """tritonclient reports a failed stream as "no longer in valid state"; the cause is in its callback."""
    import socket

    from hetserve.cli import main as hetserve

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert hetserve(["generate", "Hello", "--url", f"127.0.0.1:{port}"]) == 1
    err = capsys.readouterr().err
    assert "Connection refused" in err and "--wait SECONDS waits for it" in err
    assert "Traceback" not in err
