"""The prefill model: runs the prompt, returns the first token and the prompt's KV.

One response per request, final, holding the KV in the interchange format
(``kv_cache`` [L, 2, H, T, D], ``kv_token_ids`` [T], ``kv_fingerprint``), the
first token (``output_ids``, ``text_output``), ``finish_reason`` (empty when
generation goes on) and ``decode_parameters`` (the client's sampling
parameters for the rest of the generation).
"""

from __future__ import annotations

import json

import triton_python_backend_utils as pb_utils
from vllm.sampling_params import RequestOutputKind

from hetserve import names
from hetserve.connector_params import PARAMS_KEY, save_params
from hetserve.sampling import decode_fields, parse_json, to_sampling_params
from hetserve.triton.common import cancelled, ids_tensor, input_str, send_error, string_tensor
from hetserve.triton.engine_model import EngineModel


class PrefillModel(EngineModel):
    kv_role = "kv_producer"
    name = "prefill"

    async def handle(self, request, sender, request_id: str) -> None:
        text = input_str(request, names.TEXT_INPUT)
        if not text:
            raise ValueError("text_input is empty" if text == "" else "text_input is missing")
        fields = parse_json(input_str(request, names.SAMPLING_PARAMETERS))
        user = to_sampling_params(fields)
        params = user.clone()
        params.max_tokens = 1
        params.min_tokens = min(user.min_tokens, 1)
        params.output_kind = RequestOutputKind.FINAL_ONLY
        buf = self.pool.acquire()
        params.extra_args = {"kv_transfer_params": save_params(buf)}
        finished = False
        try:
            final = None
            async for final in self.engine.engine.generate({"prompt": text}, params, request_id):
                pass
            finished = final is not None and final.finished
            completion = final.outputs[0]
            if completion.finish_reason == "abort":
                finished = False  # the worker may still be writing the buffer
                send_error(sender, "Request was cancelled", cancelled())
                return
            num_tokens = len(final.prompt_token_ids)
            saved = (final.kv_transfer_params or {}).get(PARAMS_KEY, {}).get("num_tokens")
            if saved != num_tokens:
                raise RuntimeError(f"the engine saved KV for {saved} tokens, the prompt has {num_tokens}")
            kv = buf.view(self.fingerprint.torch_dtype, self.fingerprint.kv_shape(num_tokens))
            max_tokens = user.max_tokens if user.max_tokens is not None else self.max_model_len
            outputs = [
                pb_utils.Tensor.from_dlpack(names.KV_CACHE, kv),
                ids_tensor(names.KV_TOKEN_IDS, final.prompt_token_ids),
                string_tensor(names.KV_FINGERPRINT, self.fingerprint.to_json()),
                ids_tensor(names.OUTPUT_IDS, completion.token_ids),
                string_tensor(names.TEXT_OUTPUT, completion.text),
                string_tensor(names.FINISH_REASON, self._finish_reason(completion, max_tokens, num_tokens)),
                string_tensor(
                    names.DECODE_PARAMETERS, json.dumps(decode_fields(fields, max_tokens, user.min_tokens))
                ),
            ]
            # send() copies the KV into Triton's shared memory before returning,
            # so the buffer is free again afterwards.
            sender.send(pb_utils.InferenceResponse(output_tensors=outputs), final=True)
        finally:
            (self.pool.release if finished else self.pool.discard)(buf)

    def _finish_reason(self, completion, max_tokens: int, num_tokens: int) -> str:
        """Why generation ends after the first token, or "" when decode goes on."""
        if completion.finish_reason == "stop":
            return "stop"
        if max_tokens <= 1 or num_tokens + 1 >= self.max_model_len:
            return "length"
        return ""
