"""The plain ASGI event-stream response (server/event_stream.py), without a model: each send holds what came
since the last (the first also the opening event, the last also the closing event and the body's end), a job's
failure mid-stream becomes an error event, and a client that leaves stops the job (no more sends)."""

from __future__ import annotations

import asyncio
import threading

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed")

from minicpmo_cli.server.event_stream import EventStream  # noqa: E402
from minicpmo_cli.server.worker import Pool  # noqa: E402


class Letters:
    opening, closing = "<", ">"

    def render(self, items: list) -> str:
        return "".join(items)

    def failure(self, exc: BaseException) -> str:
        return f"!{exc}"


def job(items: list, release: threading.Event | None = None, fail: bool = False, stopped=None):
    def run(engine, cancel):
        try:
            for number, item in enumerate(items):
                if number and release is not None:
                    release.wait(10)
                    if cancel.is_set():
                        return
                yield item
            if fail:
                raise RuntimeError("broke")
        finally:
            if stopped is not None:
                stopped.set()

    return run


async def serve(response: EventStream, disconnect: asyncio.Event | None = None) -> list[dict]:
    sent = []

    async def receive():
        if disconnect is None:
            await asyncio.Event().wait()  # the client stays
        await disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    await response({"type": "http"}, receive, send)
    return sent


def bodies(sent: list[dict]) -> list[tuple[bytes, bool]]:
    return [(m["body"], m["more_body"]) for m in sent if m["type"] == "http.response.body"]


def run_pool(test):
    async def main():
        pool = Pool(lambda: None, size=2, max_waiting=4)
        try:
            return await test(pool)
        finally:
            pool.stop()

    return asyncio.run(main())


def test_an_answer_that_came_whole_is_one_body_write_with_its_opening_and_closing():
    async def test(pool):
        stream = pool.open_stream(job(["a", "b"]))
        first = await stream.first()
        while not stream.ended:  # let the end come too: one batch
            first += await stream.next()
        return await serve(EventStream(stream, first, Letters(), headers={"X-Accel-Buffering": "no"}))

    sent = run_pool(test)
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
    assert (b"content-type", b"text/event-stream; charset=utf-8") in sent[0]["headers"]
    assert bodies(sent) == [(b"<ab>", False)]


def test_items_that_come_later_go_out_as_they_come_and_the_last_send_ends_the_body():
    async def test(pool):
        release = threading.Event()
        stream = pool.open_stream(job(["a", "b", "c"], release))
        first = await stream.first()
        release.set()
        return await serve(EventStream(stream, first, Letters()))

    sent = bodies(run_pool(test))
    assert sent[0] == (b"<a", True) and sent[-1][1] is False
    assert b"".join(body for body, _ in sent) == b"<abc>"


def test_a_failure_mid_stream_is_an_error_event_before_the_closing_one():
    async def test(pool):
        release = threading.Event()
        stream = pool.open_stream(job(["a", "b"], release, fail=True))
        first = await stream.first()
        release.set()
        return await serve(EventStream(stream, first, Letters()))

    sent = bodies(run_pool(test))
    assert b"".join(body for body, _ in sent) == b"<ab!broke>" and sent[-1][1] is False


def test_a_client_that_leaves_stops_the_job_and_gets_nothing_more():
    stopped = threading.Event()

    async def test(pool):
        release, disconnect = threading.Event(), asyncio.Event()
        stream = pool.open_stream(job(["a", "b", "c"], release, stopped=stopped))
        first = await stream.first()
        serving = asyncio.ensure_future(serve(EventStream(stream, first, Letters()), disconnect))
        await asyncio.sleep(0.05)  # the first items went out; the job waits
        disconnect.set()
        sent = await asyncio.wait_for(serving, 10)
        release.set()  # the job may go on now: it finds itself cancelled
        return sent, stream.job.cancel.is_set()

    sent, cancelled = run_pool(test)
    assert cancelled and stopped.wait(10)
    assert bodies(sent) == [(b"<a", True)]
