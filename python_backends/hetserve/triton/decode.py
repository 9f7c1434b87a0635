"""The decode model: continues a generation from KV in the interchange format.

Inputs: ``kv_cache`` [L, 2, H, T, D], ``kv_token_ids`` [T] (the tokens the KV
covers), ``kv_fingerprint``, ``input_ids`` (the tokens after them, at least the
first generated one) and ``sampling_parameters`` for what remains. Streams one
response per engine step (``output_ids``, ``text_output`` deltas), the last
flagged final; a cancelled request ends with ``finish_reason`` "abort". KV
that does not match this model is refused with an error.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import triton_python_backend_utils as pb_utils
from vllm.inputs import TokensPrompt
from vllm.sampling_params import RequestOutputKind

from hetserve import names
from hetserve.connector_params import load_params
from hetserve.kv.format import ModelFingerprint, validate_kv
from hetserve.sampling import parse_json, to_sampling_params
from hetserve.text import Continuation, engine_params
from hetserve.triton.common import ids_tensor, input_str, input_tensor, string_tensor
from hetserve.triton.engine_model import EngineModel

ABORT = "abort"  # vLLM's finish reason of an aborted request
ERROR = "error"  # the stream failed after it started; text_output says why

logger = logging.getLogger(__name__)
_KV_INPUTS = (names.KV_CACHE, names.KV_TOKEN_IDS, names.KV_FINGERPRINT, names.INPUT_IDS)


class DecodeModel(EngineModel):
    kv_role = "kv_consumer"
    name = "decode"

    def _received_kv(self, request) -> tuple[torch.Tensor, list[int], list[int]]:
        tensors = {name: input_tensor(request, name) for name in _KV_INPUTS}
        missing = [name for name, tensor in tensors.items() if tensor is None]
        if missing:
            raise ValueError(f"missing input(s) {missing}")
        # Zero-copy views of the tensors in this stub's shared memory.
        kv = torch.from_dlpack(tensors[names.KV_CACHE].to_dlpack())
        kv_ids = torch.from_dlpack(tensors[names.KV_TOKEN_IDS].to_dlpack())
        new_ids = tensors[names.INPUT_IDS].as_numpy().reshape(-1).tolist()
        received = ModelFingerprint.from_json(input_str(request, names.KV_FINGERPRINT) or "")
        # One token must be left to compute, and room for one more to generate.
        validate_kv(self.fingerprint, received, kv, kv_ids, self.max_model_len - 2)
        if not new_ids:
            raise ValueError("input_ids is empty: decode needs the token(s) that follow the KV")
        return kv, kv_ids.tolist(), new_ids

    async def handle(self, request, sender, request_id: str) -> None:
        kv, kv_ids, new_ids = self._received_kv(request)
        params = to_sampling_params(parse_json(input_str(request, names.SAMPLING_PARAMETERS)))
        text = Continuation(self.engine.engine.tokenizer, request_id, kv_ids, new_ids, params)
        params = engine_params(params)
        params.output_kind = RequestOutputKind.DELTA
        buf = self.pool.acquire()
        progress = _Progress()
        try:
            buf.view(kv.dtype, tuple(kv.shape)).copy_(kv)  # into the buffer vLLM's worker reads
            params.extra_args = {"kv_transfer_params": load_params(buf, len(kv_ids))}
            prompt = TokensPrompt(prompt_token_ids=kv_ids + new_ids)
            await self._stream(sender, request_id, prompt, params, text, progress)
        finally:
            # Until a token came out, the worker may still be reading the buffer.
            (self.pool.release if progress.generated else self.pool.discard)(buf)

    async def _stream(self, sender, request_id: str, prompt, params, text: Continuation, progress: "_Progress"):
        """One response per engine step.

        Triton 2.51 never delivers an error response that follows other responses
        to a BLS caller (its iterator then waits forever), so once the stream has
        started, an abort ends it with finish_reason "abort" and a failure with
        finish_reason "error" and the message as text_output.
        """
        try:
            async for out in self.engine.engine.generate(prompt, params, request_id):
                completion = out.outputs[0]
                progress.generated |= completion.finish_reason != ABORT
                delta = text.update(list(completion.token_ids), completion.finish_reason == "stop", out.finished)
                finish = "stop" if delta.stop_string is not None else completion.finish_reason or ""
                self._send(sender, delta.token_ids, delta.text, finish)
                progress.sent = True
                if delta.stop_string is not None and not out.finished:
                    await self._abort(request_id, "stop string")
                    return
        except Exception as exc:
            if not progress.sent:
                raise  # the first response: an error response reaches the caller
            logger.exception("decode: request %s failed mid-stream", request_id)
            self._send(sender, [], f"decode: {type(exc).__name__}: {exc}", ERROR)

    @staticmethod
    def _send(sender, token_ids: list[int], text: str, finish: str) -> None:
        response = pb_utils.InferenceResponse(
            output_tensors=[
                ids_tensor(names.OUTPUT_IDS, token_ids),
                string_tensor(names.TEXT_OUTPUT, text),
                string_tensor(names.FINISH_REASON, finish),
            ]
        )
        sender.send(response, final=bool(finish))


@dataclass(slots=True)
class _Progress:
    generated: bool = False  # a token came out: the step that loaded the KV has run
    sent: bool = False  # a response went out
