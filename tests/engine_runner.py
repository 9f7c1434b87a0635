"""Offline vLLM engines in processes of their own: the tests' reference and probe.

``run_engine(request, workdir)`` runs one engine for one batch of requests and
exits. ``EngineProcess(engine, workdir)`` keeps one running for many
batches (the reference: starting vLLM takes longer than most batches); each
batch meets the engine as a fresh one would, its prefix cache emptied first.

A request is ``{"engine_args": {...}, "kv_role": null | "kv_producer" |
"kv_consumer", "kv_save": "all" | "layer", "requests": [{"prompt": str} |
{"prompt_token_ids": [...]}, with "sampling" and optionally
"kv_transfer_params"]}``. The outputs list, per request, the prompt's token
ids, the generated token ids and text, and the engine's ``kv_transfer_params``.
The process talks over a socket pair: vLLM logs to stdout and stderr, which go
to the work directory's ``engine.log``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import traceback
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any


class EngineProcess:
    """One offline engine (``LLM``) in its own process, kept for many ``generate`` calls."""

    def __init__(self, engine: dict[str, Any], workdir: Path, timeout: float = 600, env: dict[str, str] | None = None):
        """``engine``: a request's ``engine_args``, ``kv_role`` and ``kv_save`` (no ``requests``);
        ``env``: environment variables over this process's (e.g. the OpenMP team's size)."""
        self.log_path = workdir / "engine.log"
        ours, theirs = socket.socketpair()
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, __file__, str(theirs.fileno())],
                pass_fds=[theirs.fileno()], stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
            )
        theirs.close()
        self._conn = Connection(ours.detach())
        try:
            self._conn.send(engine)
            self._receive(timeout)  # the engine is up
        except BaseException:
            self.close()
            raise

    def generate(self, requests: list[dict[str, Any]], timeout: float = 600) -> list[dict[str, Any]]:
        self.submit(requests)
        return self.result(timeout)

    def submit(self, requests: list[dict[str, Any]]) -> None:
        """Start a batch; ``result`` waits for its outputs (the caller may act on the engine meanwhile)."""
        self._conn.send(requests)

    def result(self, timeout: float = 600) -> list[dict[str, Any]]:
        return self._receive(timeout)

    def _receive(self, timeout: float):
        deadline = time.monotonic() + timeout
        while not self._conn.poll(1):
            if self.process.poll() is not None:
                raise RuntimeError(f"engine process exited ({self.process.returncode}):\n{self._log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"engine process gave no answer in {timeout:g} s:\n{self._log_tail()}")
        kind, value = self._conn.recv()
        if kind == "error":
            raise RuntimeError(f"engine run failed:\n{value}\n{self._log_tail()}")
        return value

    def _log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def close(self) -> None:
        """Stop the engine (its process, which stops vLLM's own)."""
        if self.process.poll() is None:
            try:
                self._conn.send(None)
                self.process.wait(60)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()
        self._conn.close()


def run_engine(request: dict[str, Any], workdir: Path, timeout: float = 600) -> list[dict[str, Any]]:
    """Run the engine described by ``request`` in a process of its own, for its requests only."""
    engine = EngineProcess({k: v for k, v in request.items() if k != "requests"}, workdir, timeout)
    try:
        return engine.generate(request["requests"], timeout)
    finally:
        engine.close()


def _generate(engine, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    from vllm.inputs import TokensPrompt

    from hetserve.logprobs import entries
    from hetserve.sampling import to_sampling_params

    prompts, params = [], []
    for item in requests:
        prompts.append(TokensPrompt(prompt_token_ids=item["prompt_token_ids"]) if "prompt_token_ids" in item else item["prompt"])
        sampling = dict(item["sampling"])
        extra = sampling.pop("extra_args", None) or {}
        if "kv_transfer_params" in item:
            extra["kv_transfer_params"] = item["kv_transfer_params"]
        # The client's JSON fields, typed as llm types them (string keys of logit_bias, ...).
        one = to_sampling_params(sampling)
        one.extra_args = extra or None
        params.append(one)
    outputs = engine.generate(prompts, params, use_tqdm=False)
    return [
        {
            "prompt_token_ids": list(o.prompt_token_ids),
            "token_ids": list(o.outputs[0].token_ids),
            "text": o.outputs[0].text,
            "finish_reason": o.outputs[0].finish_reason,
            "logprobs": entries(o.outputs[0].logprobs),
            "cumulative_logprob": o.outputs[0].cumulative_logprob,
            "kv_transfer_params": o.kv_transfer_params,
        }
        for o in outputs
    ]


def _serve(fd: int) -> None:
    from vllm import LLM

    from hetserve.engine import with_connector

    conn = Connection(fd)
    request = conn.recv()
    args = request["engine_args"]
    if request.get("kv_role"):
        args = with_connector(args, request["kv_role"], request.get("kv_save", "all"))
    engine = LLM(**args)
    conn.send(("ok", None))
    while (requests := conn.recv()) is not None:
        try:
            if not engine.reset_prefix_cache():  # as a fresh engine: no hit on an earlier batch's prompts
                raise RuntimeError("vLLM did not reset its prefix cache")
            conn.send(("ok", _generate(engine, requests)))
        except Exception:  # noqa: BLE001 - the caller raises it
            conn.send(("error", traceback.format_exc()))


if __name__ == "__main__":  # vLLM's CPU platform spawns processes
    _serve(int(sys.argv[1]))
