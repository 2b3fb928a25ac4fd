"""A bounded pool of threads runs the model requests, many at once (the api task functions block).

Routes hand the pool a function of ``(engine, cancel)``; plain functions return a result, generator functions
yield items that reach the route as they come (streaming). Requests run concurrently: their LLM decoding meets
in the model's shared LLM engine (generation/engine.py), which batches the rows of every running request into
one step, so the pool size is the number of requests decoding together (``--max-batch``).

``cancel`` is a per-request event, set when the client goes away: a job still waiting is dropped before it
starts, a running one stops at its next token or speech frame (the api functions take the event), and a
generator job is closed. A full pool with a full waiting line answers 429 with ``Retry-After`` (never 5xx).

Seeds: a seeded request whose answer draws from torch's global random generator (the speech of text the
model re-writes, server/speech.py) runs alone (an exclusive turn on a readers-writer gate), so the same seed
gives the same answer whatever else is running. Seeded sampled text and spoken answers (whole or streamed)
draw from generators of their own and run with the others.

Streamed jobs hand their items over through a bounded :class:`~minicpmo_cli.server.outbox.Outbox`: a job
waits while its client is ``STREAM_LIMIT`` items behind, and is cancelled (its KV slot freed) when the client
reads nothing for ``stall_s`` seconds.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from minicpmo_cli.server.errors import APIError
from minicpmo_cli.server.outbox import STALL_S, STREAM_LIMIT, Outbox, Waker

logger = logging.getLogger("minicpmo_cli.server")
_DONE = object()  # end of a stream
POLL_S = 0.25  # how often a waiting non-streamed request checks whether its client is still there


class Cancelled(APIError):
    """The client went away before its job finished (499, nginx's "client closed request": no one reads it)."""

    def __init__(self) -> None:
        super().__init__(499, "the client closed the request", code="client_closed_request")


class Busy(APIError):
    """Every thread is busy and the waiting line is full: 429 with a Retry-After estimate."""

    def __init__(self, waiting: int, retry_after: int) -> None:
        super().__init__(429, f"the server is busy ({waiting} requests waiting); retry after {retry_after} s",
                         code="rate_limit_exceeded", headers={"Retry-After": str(retry_after)})


@dataclass
class Job:
    fn: Callable[..., Any]
    loop: asyncio.AbstractEventLoop
    outbox: Outbox  # items, then _DONE or an exception
    exclusive: bool = False  # runs alone (see the module docstring)
    state: str = "waiting"  # waiting -> running, or waiting -> dropped (its client left first)
    cancel: threading.Event = field(default_factory=threading.Event)
    queued_at: float = field(default_factory=time.monotonic)


class Gate:
    """Readers-writer gate: shared turns run together; an exclusive turn waits for them and runs alone.
    Writers are preferred (a waiting exclusive job stops new shared ones), so a seeded request is not starved."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False
        self._writers_waiting = 0

    def enter(self, exclusive: bool) -> None:
        with self._cond:
            if exclusive:
                self._writers_waiting += 1
                self._cond.wait_for(lambda: not self._exclusive and self._shared == 0)
                self._writers_waiting -= 1
                self._exclusive = True
            else:
                self._cond.wait_for(lambda: not self._exclusive and self._writers_waiting == 0)
                self._shared += 1

    def leave(self, exclusive: bool) -> None:
        with self._cond:
            if exclusive:
                self._exclusive = False
            else:
                self._shared -= 1
            self._cond.notify_all()


class Pool:
    """``size`` threads taking jobs from one line of at most ``max_waiting`` waiting jobs."""

    def __init__(self, get_engine: Callable[[], Any], size: int = 8, max_waiting: int = 64,
                 observer: Any = None, stall_s: float = STALL_S) -> None:
        self.get_engine, self.size, self.max_waiting = get_engine, int(size), int(max_waiting)
        self.stall_s = float(stall_s)  # a streamed job whose client reads nothing this long is cancelled
        self.observer = observer  # metrics.Metrics (job_started/job_finished), or None
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.waiting = 0
        self.running = 0
        self.gate = Gate()
        self._mean_s = 1.0  # running mean of job times: the Retry-After estimate
        self._lock = threading.Lock()
        self._waker: Waker | None = None  # the outboxes' shared wakeups, on the loop of the routes
        self.threads: list[threading.Thread] = []
        self._start_threads(self.size)

    def _start_threads(self, count: int) -> None:
        for _ in range(count):
            thread = threading.Thread(target=self._loop, name=f"minicpmo-pool-{len(self.threads)}", daemon=True)
            self.threads.append(thread)
            thread.start()

    def resize(self, size: int) -> None:
        """``size`` threads from now on (the batch the loaded model's KV budget holds): more are started, or
        as many end when they next look for a job."""
        size = max(1, int(size))
        with self._lock:
            change, self.size = size - self.size, size
        if change > 0:
            self._start_threads(change)
        for _ in range(-change):
            self.jobs.put(None)

    # --- route side -------------------------------------------------------------------------------------
    def _submit(self, fn: Callable[..., Any], exclusive: bool, streamed: bool = False) -> Job:
        with self._lock:
            if self.waiting >= self.max_waiting and self.running >= self.size:
                raise Busy(self.waiting, self.retry_after())
            self.waiting += 1
        loop = asyncio.get_running_loop()
        if self._waker is None or self._waker.loop is not loop:
            self._waker = Waker(loop)
        outbox = Outbox(loop, STREAM_LIMIT if streamed else None, self.stall_s, self._waker)
        job = Job(fn, loop, outbox, exclusive)
        self.jobs.put(job)
        return job

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: the waiting line drained at the mean job time."""
        return max(1, math.ceil(self._mean_s * (self.waiting + 1) / self.size))

    async def run(self, fn: Callable[..., Any], disconnected: Callable[[], Any] | None = None,
                  exclusive: bool = False) -> Any:
        """The result of ``fn(engine, cancel)``; polls ``disconnected()`` meanwhile and cancels on True (its
        one item, read as a stream's first)."""
        stream = Stream(self, self._submit(fn, exclusive))
        try:
            return (await stream.first(disconnected))[0]
        finally:
            stream.close()  # a no-op once done; stops the job if this coroutine is cancelled

    async def stream(self, fn: Callable[..., Any], exclusive: bool = False) -> AsyncIterator[Any]:
        """The items ``fn(engine, cancel)`` yields, as they come; leaving early cancels the job."""
        batches = self.batches(fn, exclusive)
        try:
            async for batch in batches:
                for item in batch:
                    yield item
        finally:
            await batches.aclose()  # now, not when collected: the job is cancelled when its reader leaves

    async def batches(self, fn: Callable[..., Any], exclusive: bool = False) -> AsyncIterator[list]:
        """The items ``fn(engine, cancel)`` yields, in lists of those that came since the route last took
        (one item each while the route keeps up); leaving early cancels the job."""
        stream = self.open_stream(fn, exclusive)
        try:
            while not stream.ended:
                items = await stream.next()
                if items:
                    yield items
        finally:
            stream.close()

    def open_stream(self, fn: Callable[..., Any], exclusive: bool = False) -> "Stream":
        """``fn(engine, cancel)``'s items as a :class:`Stream` the route reads (and must close)."""
        return Stream(self, self._submit(fn, exclusive, streamed=True))

    def _leave(self, job: Job) -> None:
        """The route is done with ``job``: a running job is told to stop, a waiting one leaves the line."""
        job.cancel.set()
        with self._lock:
            if job.state == "waiting":
                job.state = "dropped"
                self.waiting -= 1

    @staticmethod
    async def first(items: AsyncIterator[Any], disconnected: Callable[[], Any] | None = None) -> Any:
        """The first item of a ``stream`` (its errors still get their HTTP status); a client that leaves before
        it comes (a long prefill, the written half of a spoken answer) cancels the job."""
        task = asyncio.ensure_future(items.__anext__())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=POLL_S)
                if done:
                    return task.result()
                if disconnected is not None and await disconnected():
                    logger.info("client went away before its answer came: its request was cancelled")
                    raise Cancelled()
        except BaseException:
            task.cancel()
            await items.aclose()
            raise

    # --- worker side ------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            with self._lock:
                if job.state == "dropped":  # its client left while it waited
                    continue
                job.state = "running"
                self.waiting -= 1
                self.running += 1
            started = time.monotonic()
            if self.observer is not None:
                self.observer.job_started(started - job.queued_at)
            try:
                self.gate.enter(job.exclusive)
                try:
                    self._execute(job)
                finally:
                    self.gate.leave(job.exclusive)
            except BaseException as exc:  # noqa: BLE001 - every failure goes back to its request
                self._send(job, self._busy_if_full(exc))
            finally:
                elapsed = time.monotonic() - started
                with self._lock:
                    self.running -= 1
                    self._mean_s = 0.8 * self._mean_s + 0.2 * elapsed
                if self.observer is not None:
                    self.observer.job_finished(elapsed, job.cancel.is_set())

    def _busy_if_full(self, exc: BaseException) -> BaseException:
        """The LLM engine's full queue is the server being busy: 429 + Retry-After, not a client mistake."""
        if type(exc).__name__ == "EngineFull":
            return Busy(self.waiting, self.retry_after())
        return exc

    def _execute(self, job: Job) -> None:
        if job.cancel.is_set():
            return
        engine = self.get_engine()
        if not inspect.isgeneratorfunction(job.fn):
            self._send(job, job.fn(engine, job.cancel))
            return
        stream = job.fn(engine, job.cancel)
        try:
            for item in stream:
                if job.cancel.is_set():
                    break
                if not job.outbox.put(item, job.cancel):  # the client stopped reading (or left)
                    job.cancel.set()
                    break
        finally:
            stream.close()  # closes the text/speech streams inside, which stops their generation
            if job.outbox.stalled:
                logger.info("client read nothing for %.0f s: its request was cancelled", self.stall_s)
            elif job.cancel.is_set():
                logger.info("client went away: generation stopped")
        self._send(job, _DONE)

    def _send(self, job: Job, item: Any) -> None:
        job.outbox.put(item, final=True)

    def stop(self) -> None:
        for _ in self.threads:
            self.jobs.put(None)


class Stream:
    """A streamed job as its route reads it: lists of the items that came since the last read, then the end
    (``ended``). :meth:`close` stops the job if it still runs; :meth:`interrupt` (the client left) makes a
    waiting read answer at once."""

    def __init__(self, pool: Pool, job: Job) -> None:
        self.pool, self.job = pool, job
        self.ended = False
        self._error: BaseException | None = None  # the job's failure, raised once the items before it went out

    async def next(self, timeout: float | None = None) -> list:
        """The items that came since the last call (waits for one); [] at the end, after ``timeout`` seconds,
        or once interrupted. Raises the job's error (after its items went out)."""
        if self._error is not None:
            error, self._error, self.ended = self._error, None, True
            raise error
        if self.ended:
            return []
        taken = await self.job.outbox.take(timeout)
        if not taken or not _is_end(taken[-1]):  # the end, if any, is the job's last item
            return taken
        end = taken.pop()
        if end is _DONE:
            self.ended = True
        elif taken:
            self._error = end
        else:
            self.ended = True
            raise end
        return taken

    async def first(self, disconnected: Callable[[], Any] | None = None) -> list:
        """The first items (its errors still get their HTTP status); a client that leaves before they come (a
        long prefill, the written half of a spoken answer, a whole answer) cancels the job."""
        while True:
            items = await self.next(timeout=POLL_S)
            if items or self.ended:
                return items
            if disconnected is not None and await disconnected():
                logger.info("client went away before its answer came: its request was cancelled")
                self.close()
                raise Cancelled()

    def interrupt(self) -> None:
        """The client left: the job is told to stop, and a waiting :meth:`next` answers [] now."""
        self.job.cancel.set()
        self.job.outbox.interrupt()

    @property
    def interrupted(self) -> bool:
        return self.job.outbox.interrupted

    def close(self) -> None:
        self.pool._leave(self.job)


def _is_end(item: Any) -> bool:
    return item is _DONE or isinstance(item, BaseException)


Worker = Pool  # the name routes and tests used for the one-thread worker this pool replaces
