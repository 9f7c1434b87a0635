"""Early loads (kv/early.py) on a real vLLM CPU engine.

A consumer engine given a request whose KV is loaded early parks it until its
slot is stamped and its first token is in the slot's header, loads the KV on
its worker's thread, and then generates exactly what one engine generates,
also when a layer-wise writer's first layers are read before the rest is
written; a slot holding other KV changes the output (so the loaded KV is what
is used);
a slot its caller abandoned, or one never written, fails that request alone.
"""

import time

import torch

from engine_runner import EngineProcess, run_engine
from hetserve.connector_params import load_params, save_params
from hetserve.kv.format import ModelFingerprint
from hetserve.kv.slots import Field, SlotPool

PROMPT = [(13 * i + 7) % 2000 + 2 for i in range(150)]
GREEDY = {"max_tokens": 8, "temperature": 0, "ignore_eos": True}


def test_an_early_load_continues_like_one_engine_and_failures_stay_with_their_request(engine_args, tmp_path):
    from transformers import AutoConfig

    fp = ModelFingerprint.from_hf_config(AutoConfig.from_pretrained(engine_args["model"]), "float32")
    for role in ("producer", "consumer"):
        (tmp_path / role).mkdir()
    pool = SlotPool("test-early")
    try:
        slots = {name: pool.acquire(fp.bytes_per_token * len(PROMPT)) for name in ("good", "layered", "other", "abandoned", "unwritten")}
        refs = {name: slot.lend() for name, slot in slots.items()}
        produced = run_engine(
            {
                "engine_args": engine_args,
                "kv_role": "kv_producer",
                "requests": [
                    {"prompt_token_ids": PROMPT, "sampling": {"max_tokens": 1, "temperature": 0},
                     "kv_transfer_params": save_params(refs["good"])},
                    {"prompt_token_ids": PROMPT, "sampling": GREEDY},  # the single engine's answer
                ],
            },
            tmp_path / "producer",
        )
        reference = produced[1]["token_ids"]
        first = produced[0]["token_ids"][0]
        assert first == reference[0] and slots["good"].complete(len(PROMPT))
        slots["good"].give_first_token(first)
        # Another prompt's KV would do; zeros are simply far from this one's.
        slots["other"].kv(torch.float32, fp.kv_shape(len(PROMPT))).zero_()
        slots["other"].stamp_written(len(PROMPT))
        slots["other"].give_first_token(first)
        slots["abandoned"].abandon()
        slots["unwritten"].give_first_token(first)  # a first token, but the KV never comes

        def early(name: str, wait_s: float = 60.0) -> dict:
            return {"prompt_token_ids": PROMPT, "sampling": GREEDY,
                    "kv_transfer_params": load_params(refs[name], len(PROMPT), early_wait_s=wait_s)}

        consumer = EngineProcess({"engine_args": engine_args, "kv_role": "kv_consumer"}, tmp_path / "consumer")
        try:
            consumer.submit([
                early("good"), early("layered"), early("other"), early("abandoned"), early("unwritten", 2.0),
                {"prompt_token_ids": PROMPT, "sampling": GREEDY},
            ])
            read_early = write_layer_by_layer(slots["good"], slots["layered"], fp.kv_shape(len(PROMPT)), first)
            consumed = consumer.result()
        finally:
            consumer.close()
        log = (tmp_path / "consumer" / "engine.log").read_text()
        scattered = int(slots["good"].header[Field.SCATTER_END_NS])
    finally:
        pool.close()
    good, layered, other, abandoned, unwritten, plain = consumed
    assert good["token_ids"] == reference
    assert read_early > 0 and layered["token_ids"] == reference
    assert scattered > 0  # loaded from the slot, not recomputed
    assert other["token_ids"][0] == first and other["token_ids"] != reference
    assert (abandoned["finish_reason"], unwritten["finish_reason"]) == ("error", "error")
    assert "abandoned by its caller" in log and "was not complete within 2 s" in log
    assert "an idle step waits for a parked slot or the EngineCore" in log  # and ends when a request comes in
    assert plain["token_ids"] == reference


def write_layer_by_layer(source, slot, shape, first: int) -> int:
    """Copy ``source``'s KV into ``slot`` as prefill's layer-wise writer does (kv_save "layer"), while the
    consumer waits on it: the first half of the layers, then, once the consumer has read them, the rest,
    the stamp and the first token. The layers it read before the stamp."""
    src, dst, head = source.kv(torch.float32, shape), slot.kv(torch.float32, shape), slot.header
    num_layers, half = shape[0], (shape[0] + 1) // 2
    head[Field.NUM_TOKENS] = shape[3]
    for i in range(num_layers):
        if i == half:
            deadline = time.monotonic() + 120
            while int(head[Field.LAYERS_READ]) < half:
                assert time.monotonic() < deadline, "the consumer did not read the layers written before the stamp"
                time.sleep(0.005)
        dst[i].copy_(src[i])
        head[Field.LAYERS_WRITTEN] = i + 1
    read = int(head[Field.LAYERS_READ])
    slot.stamp_written(shape[3])
    slot.give_first_token(first)
    return read
