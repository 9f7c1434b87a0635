"""KV slots: allocation, reuse, discard, the cap, references and cross-mapping."""

import os

import pytest
import torch

from hetserve import shm
from hetserve.kv.slots import (
    HEADER_BYTES,
    MIN_SLOT_BYTES,
    Field,
    MappingCache,
    SlotError,
    SlotPool,
    SlotRef,
    map_file,
    slot_bytes,
)


def test_sizes_come_in_powers_of_two_with_room_for_the_header():
    assert slot_bytes(1) == MIN_SLOT_BYTES
    assert slot_bytes(MIN_SLOT_BYTES) == 2 * MIN_SLOT_BYTES  # the header does not fit otherwise
    assert slot_bytes(3 << 20) == 4 << 20


def test_slots_are_allocated_reused_and_names_never_are(tmp_path):
    pool = SlotPool("t", directory=str(tmp_path))
    a, b = pool.acquire(100), pool.acquire(100)
    assert a.path != b.path and os.path.getsize(a.path) == MIN_SLOT_BYTES
    assert os.stat(a.path).st_blocks * 512 >= MIN_SLOT_BYTES  # allocated up front, not sparse
    pool.release(a)
    assert pool.acquire(200) is a  # same size class: warm pages reused
    assert pool.acquire(3 << 20).capacity == 4 << 20  # another class: a new slot
    pool.discard(b)
    assert not os.path.exists(b.path)
    assert pool.acquire(100).path not in (a.path, b.path)
    pool.close()
    assert list(tmp_path.iterdir()) == []


def test_idle_slots_beyond_the_cap_are_unlinked(tmp_path):
    pool = SlotPool("t", directory=str(tmp_path), max_idle_bytes=2 * MIN_SLOT_BYTES)
    slots = [pool.acquire(1) for _ in range(4)]
    for slot in slots:
        pool.release(slot)
    assert pool.idle_bytes == 2 * MIN_SLOT_BYTES and pool.size == 2
    assert len(list(tmp_path.iterdir())) == 2
    pool.close()


def test_lending_clears_the_old_stamp_and_completion_needs_the_new_nonce(tmp_path):
    pool = SlotPool("t", directory=str(tmp_path))
    slot = pool.acquire(4096)
    first = slot.lend()
    slot.stamp_written(7)
    assert slot.complete(7) and not slot.complete(8)
    second = slot.lend()
    assert second.nonce != first.nonce and not slot.complete(7)  # a stale stamp never passes
    # A writer in another process stamps through its own mapping.
    theirs = MappingCache().get(second.path, second.capacity)[:HEADER_BYTES].view(torch.int64)
    theirs[Field.NUM_TOKENS] = 7
    theirs[Field.NONCE] = second.nonce
    assert slot.complete(7)
    pool.close()


def test_a_second_mapping_sees_the_writes(tmp_path):
    pool = SlotPool("t", directory=str(tmp_path))
    slot = pool.acquire(1 << 16)
    kv = slot.kv(torch.float32, (2, 2, 3, 5, 4))
    kv.copy_(torch.arange(kv.numel(), dtype=torch.float32).view(kv.shape))
    other = MappingCache().get(slot.path, slot.capacity)
    seen = other[HEADER_BYTES : HEADER_BYTES + kv.numel() * 4].view(torch.float32).view(kv.shape)
    assert torch.equal(seen, kv)
    pool.close()


def test_a_view_larger_than_the_slot_is_refused(tmp_path):
    pool = SlotPool("t", directory=str(tmp_path))
    slot = pool.acquire(64)
    with pytest.raises(SlotError, match="does not fit"):
        slot.kv(torch.float32, (1, 2, 1, MIN_SLOT_BYTES, 1))
    pool.close()


def test_mapping_cache_is_bounded_and_never_creates_files(tmp_path):
    cache = MappingCache(capacity=2)
    paths = [str(tmp_path / f"f{i}") for i in range(3)]
    for path in paths:
        with open(path, "wb") as f:
            f.truncate(128)
        cache.get(path, 128)
    assert len(cache._maps) == 2 and paths[0] not in cache._maps
    with pytest.raises(SlotError, match="missing"):
        cache.get(str(tmp_path / "missing"), 128)
    assert not (tmp_path / "missing").exists()
    with pytest.raises(SlotError):
        map_file(str(tmp_path / "missing"), 128)


def test_references_round_trip_and_only_name_this_servers_slots(monkeypatch):
    monkeypatch.setenv(shm.PREFIX_ENV, "hetserve-42-")
    ref = SlotRef(shm.path("llm-slot-9-0"), 1 << 20, 12345)
    assert SlotRef.from_json(ref.to_json()) == ref
    for path in (
        "/etc/passwd",
        "/dev/shm/hetserve-43-llm-slot-9-0",  # another server's
        "/dev/shm/hetserve-42-../../etc/passwd",
        "/dev/shm/hetserve-42-cancel",  # this server's, but not a slot
    ):
        with pytest.raises(ValueError, match="kv_slot"):
            SlotRef.from_json(SlotRef(path, 1 << 20, 1).to_json())
    with pytest.raises(ValueError, match="kv_slot"):
        SlotRef.from_json("{")


def test_a_new_pool_reclaims_the_slots_of_dead_owners(tmp_path):
    dead, alive = tmp_path / f"{shm.current_prefix()}m-slot-999999999-0", None
    dead.write_bytes(b"x")
    pool = SlotPool("m", directory=str(tmp_path))
    alive = pool.acquire(1)
    SlotPool("m", directory=str(tmp_path))  # a second instance: this process is alive
    assert not dead.exists() and os.path.exists(alive.path)
    pool.close()


def test_mappings_of_unlinked_slots_are_dropped(tmp_path):
    cache = MappingCache()
    paths = [str(tmp_path / f"f{i}") for i in range(2)]
    for path in paths[:1]:
        with open(path, "wb") as f:
            f.truncate(128)
        cache.get(path, 128)
    os.unlink(paths[0])
    with open(paths[1], "wb") as f:
        f.truncate(128)
    cache.get(paths[1], 128)
    assert list(cache._maps) == [paths[1]]
