"""Early loads (kv/early.py): what the worker does at each step with a parked request's slot."""

import pytest

from hetserve.kv.connector import TransferSpec
from hetserve.kv.early import FIRST_TOKENS, LAYERS_PER_IDLE_STEP, EarlyLoads, movable
from hetserve.kv.slots import Field, MappingCache, SlotPool


@pytest.fixture
def pool(tmp_path):
    pool = SlotPool("t", directory=str(tmp_path))
    yield pool
    pool.close()


def parked(pool, req_id: str = "r", wait_s: float = 60.0, num_tokens: int = 10):
    slot = pool.acquire(1000)
    ref = slot.lend()
    spec = TransferSpec(req_id, ref.path, ref.capacity, ref.nonce, num_tokens, num_tokens - 1, wait_s=wait_s)
    return slot, spec


def loads(layers: bool = False):
    """EarlyLoads whose scatter records what it copied: the request (with ``layers``: and which layers)."""
    scattered = []
    maps = MappingCache()

    def scatter(spec, start, stop):
        scattered.append((spec.req_id, start, stop) if layers else spec.req_id)

    return EarlyLoads(scatter, maps.get), scattered


def test_a_load_scatters_once_stamped_and_ends_once_the_first_token_is_there(pool):
    early, scattered = loads()
    slot, spec = parked(pool)
    early.add(spec)
    assert early.advance(set()) == (set(), set()) and scattered == []
    assert not movable(slot.header, spec.nonce)
    slot.stamp_written(10)
    assert movable(slot.header, spec.nonce)  # stamped, not scattered: a step should run
    assert early.advance(set()) == (set(), set()) and scattered == ["r"]
    head = slot.header
    assert 0 < head[Field.SCATTER_START_NS] <= head[Field.SCATTER_END_NS]
    assert not movable(slot.header, spec.nonce)  # scattered, no first token yet
    slot.give_first_token(0)  # token 0 is a token
    assert movable(slot.header, spec.nonce)
    assert early.advance(set()) == ({"r"}, set()) and scattered == ["r"]
    assert FIRST_TOKENS.pop((spec.path, spec.nonce)) == 0
    assert early.loaded("r") and not early.loaded("r")  # asked once, by its first step
    assert early.advance(set()) == (set(), set())


def test_a_slot_of_another_lending_or_too_short_is_not_loaded(pool):
    early, scattered = loads()
    slot, spec = parked(pool, "old")
    slot.lend()  # lent again: the stamp carries the new nonce
    slot.stamp_written(10)
    short, short_spec = parked(pool, "short")
    short.stamp_written(9)
    early.add(spec)
    early.add(short_spec)
    assert early.advance(set()) == ({"short"}, {"short"}) and scattered == []
    assert not movable(slot.header, spec.nonce)


@pytest.mark.parametrize("how", ["abandoned", "aborted", "late"])
def test_a_load_given_up_ends_failed_and_keeps_no_token(pool, how):
    early, scattered = loads()
    slot, spec = parked(pool, wait_s=0.0 if how == "late" else 60.0)
    slot.stamp_written(10)
    slot.give_first_token(5)
    if how == "abandoned":
        slot.abandon()
        assert movable(slot.header, spec.nonce)
    early.add(spec)
    if how == "late":
        slot.header[Field.NONCE] = 0  # never stamped for this lending
    assert early.advance({"r"} if how == "aborted" else set()) == ({"r"}, {"r"})
    assert scattered == [] and (spec.path, spec.nonce) not in FIRST_TOKENS and not early.loaded("r")


def test_a_request_aborted_after_its_load_leaves_no_token_behind(pool):
    early, _ = loads()
    slot, spec = parked(pool)
    slot.stamp_written(10)
    slot.give_first_token(7)
    early.add(spec)
    assert early.advance(set()) == ({"r"}, set())
    early.advance({"r"})  # vLLM finished it before its first step
    assert (spec.path, spec.nonce) not in FIRST_TOKENS and not early.loaded("r")


def test_a_layer_wise_writers_layers_are_read_before_its_stamp(pool):
    early, scattered = loads(layers=True)
    slot, spec = parked(pool)
    head = slot.header
    early.add(spec)
    head[Field.NUM_TOKENS] = 10  # what a layer-wise writer publishes first (kv/connector.py, save_kv_layer)
    head[Field.LAYERS_WRITTEN] = 3
    assert not movable(head, spec.nonce)  # fewer than LAYERS_PER_IDLE_STEP waiting: an idle step waits
    assert early.advance(set()) == (set(), set()) and scattered == [("r", 0, 3)]
    assert head[Field.LAYERS_READ] == 3 and not head[Field.SCATTER_END_NS]
    assert early.advance(set()) == (set(), set()) and scattered == [("r", 0, 3)]  # nothing new: nothing copied
    head[Field.LAYERS_WRITTEN] = 3 + LAYERS_PER_IDLE_STEP
    assert movable(head, spec.nonce)
    early.advance(set())
    assert scattered[-1] == ("r", 3, 3 + LAYERS_PER_IDLE_STEP) and not movable(head, spec.nonce)
    slot.stamp_written(10)
    assert movable(head, spec.nonce)
    early.advance(set())
    assert scattered[-1] == ("r", 3 + LAYERS_PER_IDLE_STEP, None)  # the rest, once stamped
    assert 0 < head[Field.SCATTER_START_NS] <= head[Field.SCATTER_END_NS]
    slot.give_first_token(4)
    assert early.advance(set()) == ({"r"}, set()) and FIRST_TOKENS.pop((spec.path, spec.nonce)) == 4
    assert len(scattered) == 3


def test_layers_written_for_another_token_count_are_not_read(pool):
    early, scattered = loads(layers=True)
    slot, spec = parked(pool)
    early.add(spec)
    slot.header[Field.NUM_TOKENS] = 9  # the writer's prompt is not the one this request expects
    slot.header[Field.LAYERS_WRITTEN] = 5
    assert early.advance(set()) == (set(), set()) and scattered == []
    slot.stamp_written(9)
    assert early.advance(set()) == ({"r"}, {"r"}) and scattered == []
