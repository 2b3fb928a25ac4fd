"""The server's job outbox (server/outbox.py) and the pool's streams over it (server/worker.py), without a model:
items come in batches of what was there, a streamed job waits while its reader is ``limit`` items behind, a
reader that takes nothing for the stall limit gets its job cancelled, and the end and errors always get through."""

from __future__ import annotations

import asyncio
import threading

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed")

from minicpmo_cli.server.outbox import Outbox, Waker  # noqa: E402
from minicpmo_cli.server.worker import Pool  # noqa: E402


def test_items_put_before_a_take_come_as_one_batch_in_order():
    async def run():
        box = Outbox(asyncio.get_running_loop())
        for item in range(5):
            assert box.put(item)
        first = await box.take()
        box.put("next")
        return first, await box.take()

    assert asyncio.run(run()) == ([0, 1, 2, 3, 4], ["next"])


def test_a_take_waits_for_an_item_from_another_thread():
    async def run():
        box = Outbox(asyncio.get_running_loop())
        waiting = asyncio.ensure_future(box.take())
        await asyncio.sleep(0)  # the take is waiting now
        threading.Thread(target=box.put, args=("late",)).start()
        return await waiting

    assert asyncio.run(run()) == ["late"]


def test_outboxes_sharing_a_waker_wake_their_takes_with_one_call_on_the_loop():
    async def run():
        loop = asyncio.get_running_loop()
        waker = Waker(loop)
        boxes = [Outbox(loop, waker=waker) for _ in range(3)]
        takes = [asyncio.ensure_future(box.take()) for box in boxes]
        await asyncio.sleep(0)  # every take is waiting now
        calls = []
        real = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *args: calls.append(args) or real(*args)
        try:
            def produce():
                for number, box in enumerate(boxes):
                    box.put(number)

            producer = threading.Thread(target=produce)
            producer.start()
            producer.join()  # the loop is held meanwhile: all three puts come before it runs the wakeup
            return await asyncio.gather(*takes), len(calls)
        finally:
            del loop.call_soon_threadsafe

    assert asyncio.run(run()) == ([[0], [1], [2]], 1)


def test_a_take_with_a_timeout_answers_empty_when_nothing_comes_and_an_interrupt_ends_a_wait():
    async def run():
        box = Outbox(asyncio.get_running_loop())
        timed_out = await box.take(timeout=0.01)
        waiting = asyncio.ensure_future(box.take())
        await asyncio.sleep(0)
        box.interrupt()
        return timed_out, await waiting

    assert asyncio.run(run()) == ([], [])


def test_a_full_outbox_holds_the_producer_until_the_reader_takes():
    async def run():
        box = Outbox(asyncio.get_running_loop(), limit=2, stall_s=600)
        done = threading.Event()

        def produce():
            for item in range(4):
                box.put(item)
            done.set()

        threading.Thread(target=produce).start()
        while box.held() < 2:
            await asyncio.sleep(0.001)
        assert not done.is_set()  # the third put waits: two items are held
        taken = []
        while len(taken) < 4:
            taken += await box.take()
        return taken

    assert asyncio.run(run()) == [0, 1, 2, 3]


def test_a_reader_that_takes_nothing_stalls_the_put_out_but_not_the_final_item():
    async def run():
        box = Outbox(asyncio.get_running_loop(), limit=1, stall_s=0.05)
        assert box.put("first")
        result = await asyncio.to_thread(box.put, "second")
        box.put("end", final=True)
        return result, box.stalled, await box.take()

    assert asyncio.run(run()) == (False, True, ["first", "end"])


def test_a_cancelled_job_stops_waiting_for_room():
    async def run():
        box = Outbox(asyncio.get_running_loop(), limit=1, stall_s=600)
        box.put("first")
        cancel = threading.Event()
        waiting = asyncio.ensure_future(asyncio.to_thread(box.put, "second", cancel))
        cancel.set()
        return await waiting, box.stalled

    assert asyncio.run(run()) == (False, False)


def stream_job(count: int, produced: list, finished: threading.Event):
    def job(engine, cancel):
        try:
            for item in range(count):
                produced.append(item)
                yield item
        finally:
            finished.set()

    return job


def test_a_pool_stream_whose_reader_stops_is_cancelled_after_the_stall_limit():
    produced, finished = [], threading.Event()

    async def run():
        pool = Pool(lambda: None, size=1, max_waiting=4, stall_s=0.05)
        try:
            batches = pool.batches(stream_job(10_000, produced, finished))
            first = await batches.__anext__()  # then the reader reads nothing more
            stopped = await asyncio.to_thread(finished.wait, 60)
            await batches.aclose()
            return first, stopped
        finally:
            pool.stop()

    first, stopped = asyncio.run(run())
    assert stopped and first[0] == 0
    assert len(produced) < 10_000  # the job was stopped long before its end


def test_a_pool_stream_that_is_read_gets_every_item_and_its_end():
    produced, finished = [], threading.Event()

    async def run():
        pool = Pool(lambda: None, size=2, max_waiting=4)
        try:
            return [item async for item in pool.stream(stream_job(500, produced, finished))]
        finally:
            pool.stop()

    assert asyncio.run(run()) == list(range(500))
