"""Admission control: limits, FIFO queue, bounded waits, clear refusals."""

import asyncio

import pytest

from hetserve.admission import Admission, Overloaded


def run(coro):
    return asyncio.run(coro)


def test_admits_up_to_the_limit_then_queues_then_refuses():
    async def main():
        tier = Admission("prefill", max_requests=2, max_queued=1, queue_timeout_s=5)
        a, b = await tier.enter(), await tier.enter()
        waiting = asyncio.ensure_future(tier.enter())
        await asyncio.sleep(0)
        assert tier.queued == 1 and not waiting.done()
        with pytest.raises(Overloaded, match=r"prefill is overloaded: 2 of 2 requests in flight.*1 queued"):
            await tier.enter()
        tier.release(a)
        c = await asyncio.wait_for(waiting, 1)
        assert tier.requests == 2 and tier.queued == 0
        for ticket in (b, c, c):  # a second release of the same ticket is a no-op
            tier.release(ticket)
        assert tier.requests == 0 and tier.bytes == 0

    run(main())


def test_queue_wait_is_bounded():
    async def main():
        tier = Admission("llm", max_requests=1, max_queued=4, queue_timeout_s=0.05)
        held = await tier.enter()
        with pytest.raises(Overloaded, match=r"waited 0\.\d s in the queue"):
            await tier.enter()
        assert tier.queued == 0
        tier.release(held)
        assert (await tier.enter()).nbytes == 0

    run(main())


def test_bytes_limit_and_fifo_order():
    async def main():
        tier = Admission("prefill", max_requests=10, max_queued=10, queue_timeout_s=5, max_bytes=100)
        big = await tier.enter(80)
        order = []

        async def want(n, tag):
            ticket = await tier.enter(n)
            order.append(tag)
            return ticket

        first = asyncio.ensure_future(want(50, "first"))
        second = asyncio.ensure_future(want(10, "second"))  # fits, but must not overtake
        await asyncio.sleep(0.01)
        assert order == [] and tier.queued == 2
        tier.release(big)
        await asyncio.gather(first, second)
        assert order == ["first", "second"] and tier.bytes == 60

    run(main())


def test_a_request_larger_than_the_byte_cap_runs_alone():
    async def main():
        tier = Admission("prefill", max_requests=4, max_queued=4, queue_timeout_s=5, max_bytes=10)
        huge = await tier.enter(1000)
        queued = asyncio.ensure_future(tier.enter(5))
        await asyncio.sleep(0.01)
        assert not queued.done()
        tier.release(huge)
        assert (await asyncio.wait_for(queued, 1)).nbytes == 5

    run(main())


def test_a_cancelled_waiter_leaves_no_trace():
    async def main():
        tier = Admission("llm", max_requests=1, max_queued=4, queue_timeout_s=5)
        held = await tier.enter()
        waiting = asyncio.ensure_future(tier.enter())
        await asyncio.sleep(0.01)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        tier.release(held)
        assert tier.requests == 0 and tier.queued == 0

    run(main())


def test_limits_must_be_positive():
    with pytest.raises(ValueError, match="positive"):
        Admission("llm", max_requests=0, max_queued=1, queue_timeout_s=1)
