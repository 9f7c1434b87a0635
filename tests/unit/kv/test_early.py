"""Early loads (kv/early.py): what the worker does at each step with a parked request's slot."""

import queue
import time

import pytest

from hetserve.kv.connector import TransferSpec
from hetserve.kv.connector import layer_group
from hetserve.kv.early import FIRST_TOKENS, EarlyLoads, engine_inputs, hold_idle, layers_per_idle_step, movable
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
    assert not movable(slot.header, spec.nonce, 10, 8)
    slot.stamp_written(10)
    assert movable(slot.header, spec.nonce, 10, 8)  # stamped, not scattered: a step should run
    assert early.advance(set()) == (set(), set()) and scattered == ["r"]
    head = slot.header
    assert 0 < head[Field.SCATTER_START_NS] <= head[Field.SCATTER_END_NS]
    assert not movable(slot.header, spec.nonce, 10, 8)  # scattered, no first token yet
    slot.give_first_token(0)  # token 0 is a token
    assert movable(slot.header, spec.nonce, 10, 8)
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
    assert not movable(slot.header, spec.nonce, 10, 8)


@pytest.mark.parametrize("how", ["abandoned", "aborted", "late"])
def test_a_load_given_up_ends_failed_and_keeps_no_token(pool, how):
    early, scattered = loads()
    slot, spec = parked(pool, wait_s=0.0 if how == "late" else 60.0)
    slot.stamp_written(10)
    slot.give_first_token(5)
    if how == "abandoned":
        slot.abandon()
        assert movable(slot.header, spec.nonce, 10, 8)
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


STEP = layers_per_idle_step(32)


def test_a_layer_wise_writers_layers_are_read_before_its_stamp(pool):
    early, scattered = loads(layers=True)
    slot, spec = parked(pool)
    head = slot.header
    early.add(spec)
    head[Field.NUM_TOKENS] = 10  # what a layer-wise writer publishes first (kv/connector.py, save_kv_layer)
    head[Field.LAYERS_WRITTEN] = 3
    assert not movable(head, spec.nonce, 10, STEP)  # fewer than STEP waiting: an idle step waits
    assert not movable(head, spec.nonce, 9, 1)  # (layers of another token count are none)
    assert early.advance(set()) == (set(), set()) and scattered == [("r", 0, 3)]
    assert head[Field.LAYERS_READ] == 3 and not head[Field.SCATTER_END_NS]
    assert early.advance(set()) == (set(), set()) and scattered == [("r", 0, 3)]  # nothing new: nothing copied
    head[Field.LAYERS_WRITTEN] = 3 + STEP
    assert movable(head, spec.nonce, 10, STEP)
    early.advance(set())
    assert scattered[-1] == ("r", 3, 3 + STEP) and not movable(head, spec.nonce, 10, STEP)
    slot.stamp_written(10)
    assert movable(head, spec.nonce, 10, STEP)
    early.advance(set())
    assert scattered[-1] == ("r", 3 + STEP, None)  # the rest, once stamped
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


def test_an_idle_step_is_held_until_a_slot_can_move_or_the_engine_has_input(pool):
    slot, spec = parked(pool)
    headers = lambda: [(slot.header, spec.nonce, 10)]  # noqa: E731
    inputs = queue.Queue()
    start = time.monotonic()
    hold_idle(headers, inputs, 8, 0.05, 0.001)  # nothing to do: held the whole bound
    assert time.monotonic() - start >= 0.05
    inputs.put("a new request")
    start = time.monotonic()
    hold_idle(headers, inputs, 8, 30.0, 0.001)  # the next step must see it
    assert time.monotonic() - start < 10
    inputs.get()
    slot.stamp_written(10)
    start = time.monotonic()
    hold_idle(headers, inputs, 8, 30.0, 0.001)  # stamped: the worker has a scatter to do
    assert time.monotonic() - start < 10


def test_the_engine_input_queue_is_found_up_the_call_stack():
    class EngineCore:  # as vLLM's busy loop: its step calls the scheduler, which calls the connector
        def __init__(self):
            self.input_queue = queue.Queue()

        def step(self):
            return schedule()

    def schedule():
        return engine_inputs()

    core = EngineCore()
    assert core.step() is core.input_queue
    assert schedule() is None  # called from anywhere else


def test_layers_per_idle_step_is_a_quarter_of_the_model_from_1_to_8():
    assert [layers_per_idle_step(n) for n in (1, 4, 12, 32, 80)] == [1, 1, 3, 8, 8]


@pytest.mark.parametrize("size", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("num_layers", [1, 2, 4, 5, 9, 32])
def test_layer_groups_copy_every_layer_once_and_only_after_it_ran(num_layers, size):
    copied = []
    for i in range(num_layers):  # vLLM runs the layers in order
        group = layer_group(i, num_layers, size)
        if group is not None:
            assert group.stop == i + 1 and group.stop - group.start <= size  # nothing later than the layer that ran
            copied.extend(range(num_layers)[group])
    assert copied == list(range(num_layers))


def test_the_scatter_time_counts_every_copy_also_those_before_the_stamp(pool):
    maps = MappingCache()
    early = EarlyLoads(lambda spec, start, stop: time.sleep(0.03), maps.get)
    slot, spec = parked(pool)
    early.add(spec)
    slot.header[Field.NUM_TOKENS] = 10
    for written in (1, 2):
        slot.header[Field.LAYERS_WRITTEN] = written
        early.advance(set())
    slot.stamp_written(10)
    early.advance(set())  # three copies of >= 30 ms each
    head = slot.header
    assert int(head[Field.SCATTER_END_NS]) - int(head[Field.SCATTER_START_NS]) >= 90e6
