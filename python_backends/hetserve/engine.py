"""vLLM's AsyncLLM on an asyncio loop in a background thread.

Triton calls ``execute`` on the stub's main thread; the engine lives on its
own loop so that ``execute`` only hands requests over and returns (as Triton's
vLLM backend does). Plain Python: no Triton imports, testable on its own.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import threading
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from hetserve.checkpoint import resolve_model
from hetserve.kv.format import ModelFingerprint

logger = logging.getLogger(__name__)

T = TypeVar("T")

SHUTDOWN_TIMEOUT_S = 30.0
CONNECTOR = "HetserveConnector"
CONNECTOR_MODULE = "hetserve.kv.connector"
FIRST_TOKEN_PROCESSOR = "hetserve.first_token:ForceFirstToken"
# The cores vLLM keeps outside the OpenMP team of one CPU worker with a KV
# connector, as every served engine has one: a core for the EngineCore, one for
# a connector's thread (vllm/utils/ompmultiprocessing.py; none on a 2-core
# host). A plain engine keeps one: given this, it runs the served engines' team.
SERVED_CPU_RESERVATION = {"VLLM_CPU_NUM_OF_RESERVED_CPU": "2"}


def engine_env(value: str) -> dict[str, str]:
    """config.pbtxt's ``engine_env``: environment variables for this model's engine processes.

    A JSON object of strings, e.g. ``{"GOMP_SPINCOUNT": "20000"}`` (see the
    README, "Tuning"); set in the stub before vLLM spawns EngineCore and its
    workers, so that both read it at start-up.
    """
    try:
        env = json.loads(value)
    except ValueError as exc:
        raise ValueError(f"engine_env is not JSON: {exc}") from None
    if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise ValueError(f'engine_env must be a JSON object of strings, e.g. {{"GOMP_SPINCOUNT": "20000"}}; got {value!r}')
    return env


def eager_cpu_env(engine_args: dict[str, Any], env: dict[str, str], on_cpu: bool) -> dict[str, str]:
    """``env`` with ``TORCH_COMPILE_DISABLE=1`` for an eager engine on the CPU, unless it sets that.

    With ``enforce_eager`` vLLM compiles none of the model, but a helper stays
    ``torch.compile``'d: the logprob ranks (``batched_count_greater_than``),
    which the CPU worker never warms up. Each engine would compile it at its
    warm-up (``EngineLoop._warm_up``): 3 to 18 s of start-up on two cores, and
    the same again for an engine restarted by the supervisor. Eager, it takes
    milliseconds and ranks the same (a count of greater logprobs). Not for a
    compiled model (no ``enforce_eager``) nor on a GPU, where CUDA graphs go
    through torch.compile.
    """
    if not on_cpu or not engine_args.get("enforce_eager") or "TORCH_COMPILE_DISABLE" in env:
        return env
    return {**env, "TORCH_COMPILE_DISABLE": "1"}


def load_engine_args(path: Path) -> dict[str, Any]:
    """Engine arguments from a model's ``model.json`` (as Triton's vLLM backend)."""
    try:
        args = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read engine arguments from {path}: {exc}") from None
    if not isinstance(args, dict) or "model" not in args:
        raise ValueError(f"{path} must be a JSON object with at least a 'model' field")
    args["model"] = resolve_model(args["model"])
    return args


def with_connector(args: dict[str, Any], role: str, save: str = "all") -> dict[str, Any]:
    """Engine arguments with hetserve's KV connector in ``role`` (a producer saves per ``save``)."""
    from vllm.config import KVTransferConfig

    args = dict(args)
    if role == "kv_consumer" and args.get("enable_prefix_caching", True):
        # Loaded KV is trusted by token ids; a local prefix cache would let one
        # bad transfer poison later requests, and hits would skip the load.
        logger.info("KV consumer: prefix caching disabled (KV arrives with each request)")
        args["enable_prefix_caching"] = False
    if role == "kv_consumer":
        args["logits_processors"] = [*(args.get("logits_processors") or []), FIRST_TOKEN_PROCESSOR]
    args["kv_transfer_config"] = KVTransferConfig(
        kv_connector=CONNECTOR, kv_connector_module_path=CONNECTOR_MODULE, kv_role=role,
        kv_connector_extra_config={"save": save} if role == "kv_producer" else {},
    )
    return args


def _already_shut_down(timeout: float | None = None) -> None:
    """AsyncLLM.shutdown, once EngineLoop.shutdown has run it."""


class EngineLoop:
    """An AsyncLLM and the event loop thread it runs on."""

    def __init__(self, engine_args: dict[str, Any], name: str = "hetserve-engine"):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()
        self.engine = self.run(self._create(engine_args))
        self.run(self._warm_up())
        config = self.engine.vllm_config.model_config
        self.max_model_len: int = config.max_model_len
        self.vocab_size: int = config.get_vocab_size()
        self.fingerprint = ModelFingerprint.from_hf_config(config.hf_config, config.dtype)

    def tokenize(self, text: str) -> list[int]:
        """The prompt's token ids, as the engine itself would make them."""
        ids = self.engine.get_tokenizer().encode(text, add_special_tokens=True)
        return self.check_prompt_ids(np.asarray(ids, dtype=np.int64), "text_input")

    def check_prompt_ids(self, ids: np.ndarray, name: str) -> list[int]:
        """``ids`` as a list, once known to be a prompt this engine can continue."""
        if ids.ndim != 1 or ids.size == 0:
            raise ValueError(f"{name} must be a non-empty list of token ids, got shape {ids.shape}")
        if ids.dtype.kind not in "iu":
            raise ValueError(f"{name} must hold integers, got {ids.dtype}")
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= self.vocab_size:
            raise ValueError(f"{name} holds token id {low if low < 0 else high}, outside the vocabulary [0, {self.vocab_size})")
        if ids.size >= self.max_model_len:
            raise ValueError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, your prompt "
                f"contains {ids.size} input tokens, which leaves no room for output tokens ({name})."
            )
        return ids.tolist()

    def check_params(self, params) -> None:
        """Raise vLLM's own error (VLLMValidationError) where this engine would refuse ``params``.

        The checks vLLM makes as a request arrives that depend on the model
        (logprobs, logit_bias and token ids against the vocabulary, structured
        outputs), made on a copy. llm makes them before it asks the prefill
        tier: prefill's refusal reaches llm without its INVALID_ARG code
        (Triton 2.51, a BLS response's error), so it looked like prefill
        failing, and llm tried the request again in its own engine.
        """
        engine = self.engine
        config = engine.vllm_config
        params.clone().verify(
            engine.model_config, config.speculative_config, config.structured_outputs_config, engine.input_processor.tokenizer
        )

    @staticmethod
    async def _create(engine_args: dict[str, Any]):
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        return AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_args))

    async def _warm_up(self) -> None:
        """One token with logprobs, before any client's request.

        vLLM computes logprob ranks with a ``torch.compile``'d kernel that its
        CPU worker does not warm up: the first request asking for logprobs would
        wait for the compiler (about 3 s here) and could run past its deadline.
        (Eager engines on the CPU run it uncompiled, ``eager_cpu_env``: then
        this takes milliseconds.) Greedy: the engine's random state stays as
        it was.
        """
        from vllm import SamplingParams, TokensPrompt

        started = time.monotonic()
        params = SamplingParams(max_tokens=1, temperature=0, logprobs=1)
        async for _ in self.engine.generate(TokensPrompt(prompt_token_ids=[0]), params, "hetserve-warm-up"):
            pass
        logger.info("engine warmed up (logprobs kernel) in %.1f s", time.monotonic() - started)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the engine loop and wait for its result."""
        return self.submit(coro).result(timeout)

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def shutdown(self) -> None:
        """Stop the engine on its own loop (from another thread it logs errors)."""

        async def stop() -> None:
            # vLLM force-kills an EngineCore still tearing down after its short
            # default, leaking its /dev/shm queues: give it time.
            self.engine.shutdown(timeout=SHUTDOWN_TIMEOUT_S)

        try:
            self.run(stop(), timeout=SHUTDOWN_TIMEOUT_S + 30)
        finally:
            # AsyncLLM.__del__ shuts down again; the stub's pending tasks keep
            # the engine alive until interpreter teardown, when vLLM's module
            # globals are already None and that second shutdown printed a
            # TypeError traceback at every stop. Done once is enough.
            self.engine.shutdown = _already_shut_down
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)
