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


def test_a_tier_that_times_out_is_left_alone_then_tried_by_one_request():
    from hetserve.routing import QUIET_MAX_S, QUIET_S

    (tier,) = parse_tiers("prefill", 32, admission)
    assert order([tier], now=0.0) == [tier]
    assert tier.timed_out(sent_at=0.0, now=60.0) == QUIET_S
    assert order([tier], now=61.0) == []  # left alone: prompts go local
    assert tier.timed_out(sent_at=1.0, now=61.0) == 0.0  # sent before the timeout was seen: the same hang
    assert order([tier], now=60.0 + QUIET_S) == [tier]  # then tried again
    assert tier.trying(now=70.0, for_s=60.0)  # the probe
    assert order([tier], now=71.0) == [] and not tier.usable(71.0)  # by that one request only
    assert tier.timed_out(sent_at=70.0, now=130.0) == 2 * QUIET_S  # it timed out too: longer
    for i in range(2000):  # a tier hung for days: the wait stays bounded (and computable)
        quiet = tier.timed_out(sent_at=200.0 + i, now=200.0 + i)
    assert quiet == QUIET_MAX_S
    tier.answered()
    assert tier.timeouts == 0 and order([tier], now=0.0) == [tier]


def test_a_probe_that_fails_otherwise_lets_the_others_try():
    (tier,) = parse_tiers("prefill", 32, admission)
    tier.timed_out(sent_at=0.0, now=0.0)
    assert tier.trying(now=10.0, for_s=1e9)
    tier.tried()  # not a timeout: its readiness says the rest
    assert order([tier]) == [tier] and tier.timeouts == 1


def test_a_tier_that_never_timed_out_is_not_held_by_trying():
    (tier,) = parse_tiers("prefill", 32, admission)
    assert not tier.trying(now=0.0, for_s=60.0)  # no probe: nothing held
    assert order([tier], now=1.0) == [tier]
