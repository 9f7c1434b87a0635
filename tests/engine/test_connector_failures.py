"""A slot that cannot be read or written fails its request alone, never the engine."""

from engine_runner import run_engine
from hetserve.connector_params import load_params, save_params
from hetserve.kv.slots import SlotPool, SlotRef

PROMPT = [(5 * i + 11) % 2000 + 2 for i in range(150)]
GREEDY = {"max_tokens": 4, "temperature": 0, "ignore_eos": True}


def test_a_missing_slot_fails_only_its_request(engine_args, tmp_path):
    missing = SlotRef("/dev/shm/hetserve-test-no-such-slot", 1 << 20, 7)
    pool = SlotPool("test-failures")
    try:
        stale = pool.acquire(1 << 16)
        ref = stale.lend()  # lent, never written: its nonce is not stamped
        requests = [
            {"prompt_token_ids": PROMPT + [3], "sampling": GREEDY, "kv_transfer_params": load_params(missing, len(PROMPT))},
            {"prompt_token_ids": PROMPT + [3], "sampling": GREEDY, "kv_transfer_params": load_params(ref, len(PROMPT))},
            {"prompt_token_ids": PROMPT, "sampling": GREEDY},
        ]
        consumer = run_engine({"engine_args": engine_args, "kv_role": "kv_consumer", "requests": requests}, tmp_path)
    finally:
        pool.close()
    assert [o["finish_reason"] for o in consumer[:2]] == ["error", "error"]
    assert consumer[2]["finish_reason"] == "length" and len(consumer[2]["token_ids"]) == 4


def test_a_missing_slot_leaves_the_producer_serving(engine_args, tmp_path):
    missing = SlotRef("/dev/shm/hetserve-test-no-such-slot", 1 << 20, 7)
    requests = [
        {"prompt_token_ids": PROMPT, "sampling": {"max_tokens": 1, "temperature": 0}, "kv_transfer_params": save_params(missing)},
        {"prompt_token_ids": PROMPT, "sampling": GREEDY},
    ]
    producer = run_engine({"engine_args": engine_args, "kv_role": "kv_producer", "requests": requests}, tmp_path)
    assert len(producer[0]["token_ids"]) == 1  # the save failed (logged); the caller finds the slot unstamped
    assert len(producer[1]["token_ids"]) == 4
