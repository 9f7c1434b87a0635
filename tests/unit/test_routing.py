"""The routing policy: which prefill tiers a prompt is offered to, in which order."""

import pytest

from hetserve.admission import Admission
from hetserve.routing import eligible, order, parse_tiers


def admission(model):
    return Admission(model, max_requests=4, max_queued=4, queue_timeout_s=1)


def test_tiers_parse_with_their_own_or_the_default_minimum():
    tiers = parse_tiers("prefill, prefill_cpu:512", 32, admission)
    assert [(t.model, t.min_tokens) for t in tiers] == [("prefill", 32), ("prefill_cpu", 512)]
    for bad, message in (
        ("a,a", "listed twice"),
        ("a:b", "not MODEL, MODEL:MIN_TOKENS or grpc://HOST:PORT/MODEL"),
        (",", "not MODEL"),
        ("grpc://h:1/a, grpc://h:1/a:64", "grpc://h:1/a is listed twice"),
        ("http://h:1/a", "not MODEL"),
    ):
        with pytest.raises(ValueError, match=message):
            parse_tiers(bad, 32, admission)


def test_no_tier_means_every_prompt_is_prefilled_locally():
    assert parse_tiers("", 32, admission) == [] and parse_tiers("  ", 32, admission) == []
    assert order(eligible([], 10_000)) == []


def test_a_tier_on_another_server_is_named_by_its_grpc_address():
    tiers = parse_tiers("prefill:64, grpc://10.0.0.7:8001/prefill:512, grpc://[::1]:9001/prefill", 32, admission)
    assert [(t.url, t.model, t.min_tokens) for t in tiers] == [
        (None, "prefill", 64), ("10.0.0.7:8001", "prefill", 512), ("[::1]:9001", "prefill", 32),
    ]
    # Same model name, three tiers: each has its own name and its own admission.
    assert [t.name for t in tiers] == ["prefill", "grpc://10.0.0.7:8001/prefill", "grpc://[::1]:9001/prefill"]
    assert [t.admission.name for t in tiers] == [t.name for t in tiers]


def test_a_prompt_goes_to_the_tiers_that_take_its_length():
    tiers = parse_tiers("gpu:32,cpu:512", 32, admission)
    assert eligible(tiers, 31) == []  # local prefill
    assert [t.model for t in eligible(tiers, 100)] == ["gpu"]
    assert [t.model for t in eligible(tiers, 600)] == ["gpu", "cpu"]


def test_least_loaded_ready_tier_first_then_one_retry():
    tiers = parse_tiers("a,b,c", 1, admission)
    assert [t.model for t in order(tiers)] == ["a", "b"]  # ties: listed order; at most two attempts
    tiers[0].admission.requests = 3
    tiers[1].admission.requests = 1
    assert [t.model for t in order(tiers)] == ["c", "b"]
    tiers[2].ready = False  # unloaded or being reloaded
    assert [t.model for t in order(tiers)] == ["b", "a"]
    for tier in tiers:
        tier.ready = False
    assert order(tiers) == []  # local prefill
