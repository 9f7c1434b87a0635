"""Shared-memory KV buffers: reuse, discard, clean-up, cross-mapping."""

import os

import torch

from hetserve.kv.buffers import BufferPool, MappingCache, map_file


def test_buffers_are_reused_and_names_never_are(tmp_path):
    pool = BufferPool("t", 4096, directory=str(tmp_path))
    a = pool.acquire()
    b = pool.acquire()
    assert a.path != b.path and os.path.getsize(a.path) == 4096
    pool.release(a)
    assert pool.acquire() is a  # warm pages reused
    pool.discard(b)
    assert not os.path.exists(b.path)
    c = pool.acquire()
    assert c.path not in (a.path, b.path)
    assert pool.size == 2
    pool.close()
    assert list(tmp_path.iterdir()) == []


def test_a_second_mapping_sees_the_writes(tmp_path):
    pool = BufferPool("t", 1 << 16, directory=str(tmp_path))
    buf = pool.acquire()
    kv = buf.view(torch.float32, (2, 2, 3, 5, 4))
    kv.copy_(torch.arange(kv.numel(), dtype=torch.float32).view(kv.shape))
    other = MappingCache().get(buf.path, buf.nbytes)
    seen = other[: kv.numel() * 4].view(torch.float32).view(kv.shape)
    assert torch.equal(seen, kv)
    pool.close()


def test_view_refuses_kv_larger_than_the_buffer(tmp_path):
    pool = BufferPool("t", 64, directory=str(tmp_path))
    buf = pool.acquire()
    try:
        buf.view(torch.float32, (1, 2, 1, 9, 1))
    except ValueError as exc:
        assert "does not fit" in str(exc)
    else:
        raise AssertionError("an oversized view was allowed")
    pool.close()


def test_mapping_cache_is_bounded_and_reports_missing_files(tmp_path):
    cache = MappingCache(capacity=2)
    paths = [str(tmp_path / f"f{i}") for i in range(3)]
    for path in paths:
        map_file(path, 128)
        cache.get(path, 128)
    assert len(cache._maps) == 2 and paths[0] not in cache._maps
    try:
        cache.get(str(tmp_path / "missing"), 128)
    except FileNotFoundError as exc:
        assert "missing" in str(exc)
    else:
        raise AssertionError("a missing buffer was mapped")
