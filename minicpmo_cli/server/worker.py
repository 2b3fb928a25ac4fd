"""One worker thread runs every model request, one at a time: never two requests in one cache.

Routes hand the worker a function of ``(engine, cancel)``; plain functions return a result, generator
functions yield items that reach the route as they come (streaming). ``cancel`` is set when the client goes
away: a job still waiting is dropped, a running one stops at its next piece (closing a text stream stops the
generation thread too). A full queue is refused at once (503) rather than piling up latency.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from minicpmo_cli.server.errors import APIError

logger = logging.getLogger("minicpmo_cli.server")
_DONE = object()  # end of a stream


class Cancelled(Exception):
    """The client went away before its job finished."""


@dataclass
class Job:
    fn: Callable[..., Any]
    loop: asyncio.AbstractEventLoop
    outbox: asyncio.Queue  # items, then _DONE or an exception
    cancel: threading.Event = field(default_factory=threading.Event)


class Worker:
    def __init__(self, get_engine: Callable[[], Any], max_queue: int = 64) -> None:
        self.get_engine = get_engine
        self.max_queue = max_queue
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self._waiting = 0
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self._loop, name="minicpmo-worker", daemon=True)
        self.thread.start()

    # --- route side -------------------------------------------------------------------------------------
    def _submit(self, fn: Callable[..., Any]) -> Job:
        with self._lock:
            if self._waiting >= self.max_queue:
                raise APIError(503, f"the server is busy ({self.max_queue} requests waiting); retry later",
                               code="queue_full")
            self._waiting += 1
        job = Job(fn, asyncio.get_running_loop(), asyncio.Queue())
        self.jobs.put(job)
        return job

    async def run(self, fn: Callable[..., Any], disconnected: Callable[[], Any] | None = None) -> Any:
        """The result of ``fn(engine, cancel)``; polls ``disconnected()`` meanwhile and cancels on True."""
        job = self._submit(fn)
        try:
            while True:
                try:
                    item = await asyncio.wait_for(job.outbox.get(), timeout=0.25)
                    break
                except asyncio.TimeoutError:
                    if disconnected is not None and await disconnected():
                        job.cancel.set()
                        logger.info("client went away: its request was cancelled")
                        raise Cancelled() from None
        finally:
            job.cancel.set()  # a no-op once done; stops the job if this coroutine is cancelled
        if isinstance(item, BaseException):
            raise item
        return item

    async def stream(self, fn: Callable[..., Any]) -> AsyncIterator[Any]:
        """The items ``fn(engine, cancel)`` yields, as they come; leaving early cancels the job."""
        job = self._submit(fn)
        try:
            while True:
                item = await job.outbox.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            job.cancel.set()

    # --- worker side ------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            with self._lock:
                self._waiting -= 1
            if job.cancel.is_set():
                continue
            try:
                self._execute(job)
            except BaseException as exc:  # noqa: BLE001 - every failure goes back to its request
                self._send(job, exc)

    def _execute(self, job: Job) -> None:
        engine = self.get_engine()
        if not inspect.isgeneratorfunction(job.fn):
            self._send(job, job.fn(engine, job.cancel))
            return
        stream = job.fn(engine, job.cancel)
        try:
            for item in stream:
                if job.cancel.is_set():
                    logger.info("client went away: generation stopped")
                    break
                self._send(job, item)
        finally:
            stream.close()  # closes the text stream inside, which stops its generation thread
        self._send(job, _DONE)

    def _send(self, job: Job, item: Any) -> None:
        try:
            job.loop.call_soon_threadsafe(job.outbox.put_nowait, item)
        except RuntimeError:  # the event loop is gone (server shutting down)
            pass

    def stop(self) -> None:
        self.jobs.put(None)
