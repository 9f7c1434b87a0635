"""DaemonPool: idle threads are reused, a stuck call never starves the others."""

import threading
import time

from hetserve.daemon_pool import DaemonPool


def wait_until(condition, timeout_s=5.0):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_calls_in_a_row_reuse_one_thread():
    pool = DaemonPool("t")
    names = []
    for _ in range(20):
        done = threading.Event()
        pool.run(lambda done=done: (names.append(threading.current_thread().name), done.set()))
        assert done.wait(5)
        wait_until(lambda: pool._idle == 1)  # back in the pool
    assert pool.started == 1 and set(names) == {"t-1"}
    assert threading.current_thread().name not in names


def test_stuck_calls_keep_their_threads_and_new_calls_start_others():
    pool = DaemonPool("t")
    never = threading.Event()
    for _ in range(3):
        pool.run(never.wait)  # blocks "for ever" (a dead stub's BLS call)
    done = []
    for i in range(5):
        pool.run(lambda i=i: done.append(i))
    wait_until(lambda: len(done) == 5)
    assert sorted(done) == list(range(5))
    assert pool.started >= 4  # three stuck, at least one more for the rest
    assert all(t.daemon for t in threading.enumerate() if t.name.startswith("t-"))
    never.set()


def test_a_call_that_raises_gives_its_thread_back():
    pool = DaemonPool("t")
    pool.run(lambda: 1 / 0)
    wait_until(lambda: pool._idle == 1)
    done = threading.Event()
    pool.run(done.set)
    assert done.wait(5) and pool.started == 1
