"""HetserveConnector's producer side on a real vLLM CPU engine, against HF.

The KV a prefill engine saves through the connector (gathered from the
CPU_ATTN paged cache by the converter) must equal the ``past_key_values`` that
HF transformers computes for the same prompt on the same checkpoint, for every
prompt token: the partial last block included, and with the prompt split over
several scheduler steps (chunked prefill); copied at the end of the step
(kv_save "all") and layer by layer as vLLM runs each (kv_save "layer", which
publishes its progress in the slot's header). Asked
for a transfer dtype (int8, fp8_e4m3), the worker encodes as it saves: the slot
decodes to that KV within the dtype's stated bound (kv/transfer.py).
"""

import pytest
import torch

from engine_runner import run_engine
from hetserve.connector_params import save_params
from hetserve.kv import transfer
from hetserve.kv.slots import Field, SlotPool
from hetserve.kv.format import ModelFingerprint

LENGTHS = [1, 127, 128, 129, 600]
ENCODED = ("int8", "fp8_e4m3")


@pytest.fixture(scope="module", params=["all", "layer"])
def saved_kv(request, engine_args, tmp_path_factory):
    """The KV saved for LENGTHS prompts, with every layer copied at once or each as vLLM finishes it."""
    from transformers import AutoConfig

    fp = ModelFingerprint.from_hf_config(AutoConfig.from_pretrained(engine_args["model"]), "float32")
    pool = SlotPool("test-engine")
    try:
        slots = [pool.acquire(fp.bytes_per_token * n) for n in LENGTHS]
        refs = [slot.lend() for slot in slots]
        # Token ids straight from the vocabulary, so lengths are exact.
        prompts = [[(7 * i + 3) % 2000 + 2 for i in range(n)] for n in LENGTHS]
        # The same prompts again, saved encoded (the longest only: it spans steps and blocks).
        encoded = {name: pool.acquire(fp.bytes_per_token * LENGTHS[-1]) for name in ENCODED}
        encoded_refs = {name: slot.lend() for name, slot in encoded.items()}
        # A small token budget forces the 600-token prompt into several steps.
        args = {**engine_args, "max_num_batched_tokens": 256, "max_num_seqs": 8}
        workdir = tmp_path_factory.mktemp("engine")
        outputs = run_engine(
            {
                "engine_args": args,
                "kv_role": "kv_producer",
                "kv_save": request.param,
                "requests": [
                    {"prompt_token_ids": ids, "sampling": {"max_tokens": 1, "temperature": 0}, "kv_transfer_params": params}
                    for ids, params in [
                        *((ids, save_params(ref)) for ids, ref in zip(prompts, refs)),
                        *((prompts[-1], save_params(ref, name)) for name, ref in encoded_refs.items()),
                    ]
                ],
            },
            workdir,
        )
        log = (workdir / "engine.log").read_text()
        assert ("KV saved layer by layer" in log) == (request.param == "layer")
        assert "layers saved layer by layer; copying all of them now" not in log
        assert all(slot.complete(len(ids)) for ids, slot in zip(prompts, slots))  # stamped after the copy
        # Layer by layer, each group of layers was published for an early reader (kv/early.py) as it landed.
        published = [int(slot.header[Field.LAYERS_WRITTEN]) for slot in slots]
        assert published == [fp.num_layers if request.param == "layer" else 0] * len(slots)
        assert all(slot.complete(LENGTHS[-1]) for slot in encoded.values())
        saved = [slot.kv(torch.float32, fp.kv_shape(len(ids))).clone() for ids, slot in zip(prompts, slots)]
        shape = fp.kv_shape(LENGTHS[-1])
        decoded = {}
        for name, slot in encoded.items():
            payload, scales = transfer.views(slot.data, name, torch.float32, shape)
            decoded[name] = (torch.empty(shape), scales.clone())
            transfer.decode_into(payload, scales, name, decoded[name][0])
        yield prompts, outputs[: len(LENGTHS)], saved, decoded
    finally:
        pool.close()


@pytest.fixture(scope="module")
def hf_model(engine_args):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(engine_args["model"], dtype=torch.float32).eval()


def test_engine_reports_every_prompt_token(saved_kv):
    prompts, outputs, _, _ = saved_kv
    for ids, out in zip(prompts, outputs):
        assert out["kv_transfer_params"] == {"hetserve": {"num_tokens": len(ids)}}


@pytest.mark.parametrize("index", range(len(LENGTHS)), ids=[f"tokens={n}" for n in LENGTHS])
def test_saved_kv_equals_hf_past_key_values(saved_kv, hf_model, index):
    prompts, _, saved, _ = saved_kv
    ids = prompts[index]
    with torch.no_grad():
        cache = hf_model(torch.tensor([ids]), use_cache=True).past_key_values
    kv = saved[index]  # [L, 2, H, T, D]
    for layer, hf_layer in enumerate(cache.layers):
        for half, hf_tensor in ((0, hf_layer.keys[0]), (1, hf_layer.values[0])):  # [H, T, D]
            ours = kv[layer, half]
            rel = (ours - hf_tensor).abs().max() / hf_tensor.abs().max()
            assert rel < 1e-5, f"layer {layer} {'kv'[half]}: relative error {rel:.2e}"


@pytest.mark.parametrize("name", ENCODED)
def test_the_worker_encodes_as_it_saves(saved_kv, name):
    """The slot holds the prompt's KV in ``name``: it decodes to the exact save within the stated bound."""
    _, _, saved, decoded = saved_kv
    exact, (got, scales) = saved[-1], decoded[name]
    s = scales.unsqueeze(-1)
    bound = s / 2 if name == "int8" else exact.abs() / 16 + s * 2**-10
    error = (got - exact).abs()
    # (+ float32 noise: the two saves are separate requests, batched differently)
    assert bool((error <= bound * 1.01 + exact.abs() * 1e-5).all()), float(error.max())
    assert float(error.max()) > 0  # it was encoded, not copied
