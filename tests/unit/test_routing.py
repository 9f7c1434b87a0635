"""The routing policy: which prefill tiers a prompt is offered to, in which order."""

import pytest

from hetserve.admission import Admission
from hetserve.routing import eligible, order, parse_tiers


def admission(model):
    return Admission(model, max_requests=4, max_queued=4, queue_timeout_s=1)


def test_tiers_parse_with_their_own_or_the_default_minimum():
    tiers = parse_tiers("prefill, prefill_cpu:512", 32, admission)
    assert [(t.model, t.min_tokens) for t in tiers] == [("prefill", 32), ("prefill_cpu", 512)]
    for bad, message in (("a,a", "listed twice"), ("a:b", "not MODEL or MODEL:MIN_TOKENS"), ("", "not MODEL")):
        with pytest.raises(ValueError, match=message):
            parse_tiers(bad, 32, admission)


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
