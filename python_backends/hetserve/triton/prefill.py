"""The prefill model: runs the prompt, returns the first token and the prompt's KV.

Inputs: the prompt as ``input_ids`` (what ``llm`` sends: it has tokenized
already) or ``text_input``; ``sampling_parameters`` (the client's: the first
token is sampled here); ``request_id`` (how llm cancels it through the
CancelBoard); ``kv_slot``, a reference to the caller's slot (slots.SlotRef).

With ``kv_slot`` (same host), vLLM's worker writes the KV from its paged cache
into that slot, and the one final response is small: ``output_ids`` (the
first token), ``finish_reason`` ("stop" when that token ends the generation,
else empty), ``kv_token_ids``, ``kv_fingerprint`` and ``kv_ref`` (JSON: token
count and the worker's copy times) and ``logprobs`` (the first token's, JSON,
when the sampling parameters ask for logprobs). Without it (tensor transport: another
server, or a client that wants the KV), the KV goes into a slot of this
model's own and is returned as the ``kv_cache`` tensor [L, 2, H, T, D], in
the transfer dtype ``kv_dtype`` asks for (kv/transfer.py: the model's by
default; int8 and fp8_e4m3 with ``kv_scales``), encoded by the worker as it
gathers the KV into the slot.
"""

from __future__ import annotations

import json

import triton_python_backend_utils as pb_utils
from vllm.inputs import TokensPrompt
from vllm.sampling_params import RequestOutputKind

from hetserve import names
from hetserve.connector_params import save_params
from hetserve.kv import transfer
from hetserve.kv.slots import Field, MappingCache, Slot, SlotRef, header, written_tokens
from hetserve.logprobs import entries
from hetserve.sampling import parse_json, to_sampling_params
from hetserve.text import engine_params
from hetserve.triton.common import ids_tensor, input_ids, input_str, string_tensor
from hetserve.triton.engine_model import EngineModel, Flow, cancellation

ABORT = "abort"


class PrefillModel(EngineModel):
    kv_role = "kv_producer"
    name = "prefill"
    reads_cancel_board = True

    def __init__(self, args: dict[str, str]):
        super().__init__(args)
        self._lent = MappingCache()  # callers' slots, to check what the worker wrote

    def _prompt_ids(self, request) -> list[int]:
        ids = input_ids(request, names.INPUT_IDS)
        if ids is not None:
            return self.engine.check_prompt_ids(ids, names.INPUT_IDS)
        text = input_str(request, names.TEXT_INPUT)
        if not text:
            raise ValueError("text_input is empty" if text == "" else "text_input or input_ids is required")
        return self.engine.tokenize(text)

    async def handle(self, request, flow: Flow) -> None:
        ids = self._prompt_ids(request)
        params = engine_params(to_sampling_params(parse_json(input_str(request, names.SAMPLING_PARAMETERS))))
        params.max_tokens = 1
        params.min_tokens = min(params.min_tokens, 1)
        params.output_kind = RequestOutputKind.FINAL_ONLY
        # The first token's logprobs carry decoded tokens as a single engine's do.
        params.detokenize = params.logprobs is not None
        transfer_dtype = transfer.check(input_str(request, names.KV_DTYPE_INPUT) or transfer.AUTO)
        shape, model_dtype = self.fingerprint.kv_shape(len(ids)), self.fingerprint.torch_dtype
        lent = input_str(request, names.KV_SLOT)
        own: Slot | None = None
        if lent:  # (same host: never compressed)
            ref = SlotRef.from_json(lent)
            written = self._lent.get(ref.path, ref.capacity)
            transfer_dtype = transfer.AUTO
        else:
            own = self.slots.acquire(transfer.encoded_nbytes(transfer_dtype, model_dtype, shape))
            ref, written = own.lend(), own.data
        # The worker encodes the KV into the transfer dtype as it gathers it.
        params.extra_args = {"kv_transfer_params": save_params(ref, transfer_dtype)}
        engine_done = False
        try:
            flow.in_engine = True
            final = None
            async for final in self.engine.engine.generate(TokensPrompt(prompt_token_ids=ids), params, flow.request_id):
                pass
            completion = final.outputs[0]
            engine_done = final.finished and completion.finish_reason != ABORT
            if not engine_done or flow.cancelled:
                raise cancellation()
            head = header(written)
            if written_tokens(head, ref.nonce) != len(ids):
                raise RuntimeError("the engine did not save the prompt's KV (see the server log)")
            outputs = [
                ids_tensor(names.OUTPUT_IDS, completion.token_ids),
                string_tensor(names.FINISH_REASON, "stop" if completion.finish_reason == "stop" else ""),
                ids_tensor(names.KV_TOKEN_IDS, ids),
                string_tensor(names.KV_FINGERPRINT, self.fingerprint.to_json()),
                string_tensor(names.LOGPROBS, json.dumps(entries(completion.logprobs))),
                string_tensor(names.KV_REF, json.dumps({
                    "num_tokens": len(ids),
                    "gather_start_ns": int(head[Field.GATHER_START_NS]),
                    "gather_end_ns": int(head[Field.GATHER_END_NS]),
                    "transfer_dtype": transfer_dtype,
                })),
            ]
            if own is None:
                flow.sender.send(pb_utils.InferenceResponse(output_tensors=outputs), final=True)
                return
            kv, scales = transfer.views(own.data, transfer_dtype, model_dtype, shape)
            if scales is not None:
                outputs.append(pb_utils.Tensor.from_dlpack(names.KV_SCALES, scales))
            outputs.append(pb_utils.Tensor.from_dlpack(names.KV_CACHE, kv))
            # send() copies the KV into Triton's shared memory: own is free after it.
            await flow.sender.send_final_off_loop(pb_utils.InferenceResponse(output_tensors=outputs))
        finally:
            if own is not None:
                # Until the engine is done with the request, its worker may still write.
                (self.slots.release if engine_done else self.slots.discard)(own)
