"""A prefill tier that hangs (alive, reading ready, answering nothing) costs one timeout, not one per prompt.

prefill's EngineCore is stopped (SIGSTOP): its model still reads ready and
nothing dies, so only ``prefill_timeout_s`` (4 s here) ends the first long
prompt's wait, which then is prefilled locally. The tier is then left alone
for a while (routing.QUIET_S): the next long prompt goes local at once. Once
the engine runs again, a prompt after the quiet time is prefilled by the tier.
Every output is one engine's.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from conftest import run_server
from hetserve.routing import QUIET_S
from hetserve_client import stream_grpc
from test_chaos import engine_core

TIMEOUT_S = 4
PROMPTS = ["model token " * 200, "cache " * 127, "prefill decode " * 64]  # all long enough for prefill
GREEDY = {"max_tokens": 8, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def hung_server(tmp_path_factory):
    yield from run_server(tmp_path_factory, f"--model-parameter=llm:prefill_timeout_s={TIMEOUT_S}")


def prefilled_by(server, where: str) -> float:
    return server.metrics().get(f'hetserve_prefills_total{{model="llm",prefilled_by="{where}",version="1"}}', 0)


def timed(server, prompt: str) -> tuple[list[int], float]:
    started = time.monotonic()
    ids = [t for d in stream_grpc(server.grpc_url, prompt, GREEDY) for t in d.token_ids]
    return ids, time.monotonic() - started


def test_a_hung_prefill_tier_is_left_alone_after_one_timeout(hung_server, reference):
    want = [w["token_ids"] for w in reference(PROMPTS, GREEDY)]
    assert timed(hung_server, PROMPTS[0])[0] == want[0]  # warm, through prefill
    assert prefilled_by(hung_server, "prefill") == 1
    core = engine_core(hung_server, "prefill")
    os.kill(core.pid, signal.SIGSTOP)
    try:
        ids, took = timed(hung_server, PROMPTS[1])
        assert ids == want[1] and took >= TIMEOUT_S  # waited it out, then prefilled locally
        ids, took = timed(hung_server, PROMPTS[2])
        assert ids == want[2] and took < TIMEOUT_S  # left alone: local at once
        assert prefilled_by(hung_server, "local") == 2
        assert f"prefill gets no prompts for {QUIET_S:g} s (1 timeout(s) in a row)" in hung_server.log_text()
    finally:
        os.kill(core.pid, signal.SIGCONT)
    time.sleep(QUIET_S + 0.5)
    assert timed(hung_server, PROMPTS[0])[0] == want[0]
    assert prefilled_by(hung_server, "prefill") == 2  # tried again once quiet, and it answered
