"""A job's outbox: what a pool thread hands the event loop (items of a stream, or one result).

Two costs of the plain ``asyncio.Queue`` + ``call_soon_threadsafe`` per item are removed here:

- Wakeups: one ``call_soon_threadsafe`` (a write to the loop's self-pipe) per batch, not per item: while the
  route has not yet taken what is there, further items join it without waking the loop again, and the route
  takes every item there at once (:meth:`take`). Under load a stream's pieces go out in fewer, larger writes
  (vLLM's output collector merges deltas the same way); alone, every piece still goes out as it comes.
  Outboxes that share a :class:`Waker` (a pool's) also share that write: when the engine hands every stream
  its ids at once, the threads that pass them on wake the loop once, not once each.
- Memory: a streamed job may be at most ``limit`` items ahead of its client (backpressure: the pool thread
  waits in :meth:`put`, so a spoken answer stops synthesising). A client that stays connected but stops
  reading for ``stall_s`` seconds is given up on: :meth:`put` answers False and the job is cancelled, which
  frees its KV slot.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from typing import Any

STREAM_LIMIT = 64  # items a streamed job may be ahead of its client
STALL_S = 60.0  # seconds a streamed job waits for a client that stopped reading before it is cancelled
_WAIT_STEP_S = 0.25  # how often a waiting pool thread checks whether its job was cancelled


class Outbox:
    """Items from one producer thread to one consumer coroutine, taken in batches; see the module docstring.

    ``limit``: items held at most before :meth:`put` waits (None: unbounded, for a job's one result)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, limit: int | None = None, stall_s: float = STALL_S,
                 waker: Waker | None = None) -> None:
        self.loop, self.limit, self.stall_s = loop, limit, float(stall_s)
        self.waker = waker
        self._items: deque = deque()
        self._cond = threading.Condition()
        self._waiter: asyncio.Future | None = None  # the route's wait in take (on the loop)
        self._woken = False  # a wakeup is on its way to the loop (or the route is not waiting yet)
        self.stalled = False
        self.interrupted = False  # the reader gave up (its client left): take answers at once

    # --- the pool thread ------------------------------------------------------------------------------------
    def put(self, item: Any, cancel: threading.Event | None = None, final: bool = False) -> bool:
        """Hand ``item`` over; waits while ``limit`` items are held. False (the item is dropped) when the
        client read nothing for ``stall_s`` seconds or ``cancel`` was set meanwhile. ``final`` items (the end,
        an error) are never held back."""
        with self._cond:
            if not final and self.limit is not None and not self._wait_for_room(cancel):
                return False
            self._items.append(item)
            wake, self._woken = not self._woken, True
        if wake:
            if self.waker is not None:
                self.waker.wake(self)
            else:
                _call_on_loop(self.loop, self._wake)
        return True

    def _wait_for_room(self, cancel: threading.Event | None) -> bool:
        started = time.monotonic()
        while len(self._items) >= self.limit:
            if cancel is not None and cancel.is_set():
                return False
            waited = time.monotonic() - started
            if waited >= self.stall_s:
                self.stalled = True
                return False
            self._cond.wait(min(_WAIT_STEP_S, self.stall_s - waited))
        return True

    # --- the route (event loop) -----------------------------------------------------------------------------
    async def take(self, timeout: float | None = None) -> list:
        """Every item there; waits for the first. [] when ``timeout`` seconds passed first, or once
        :meth:`interrupt` was called."""
        deadline = None if timeout is None else self.loop.time() + timeout
        timer = None
        try:
            while True:
                with self._cond:
                    self._woken = False
                    if self._items:
                        batch = list(self._items)
                        self._items.clear()
                        self._cond.notify_all()
                        return batch
                if self.interrupted or (deadline is not None and self.loop.time() >= deadline):
                    return []
                # set before the next await, so a wakeup scheduled after the look above finds it
                self._waiter = self.loop.create_future()
                if deadline is not None and timer is None:
                    timer = self.loop.call_at(deadline, self._wake)
                await self._waiter
        finally:
            if timer is not None:
                timer.cancel()

    def _wake(self) -> None:
        """On the loop: the waiting take looks again (an item came, its time ran out, or it was interrupted)."""
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def interrupt(self) -> None:
        """On the loop: the reader stops waiting (its client left); a take now answers [] at once."""
        self.interrupted = True
        self._wake()

    def held(self) -> int:
        with self._cond:
            return len(self._items)


class Waker:
    """Wakes the outboxes of one event loop from other threads with one self-pipe write for all those that
    became ready before the loop got to them (each write is a system call, and one more wakeup of the loop)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._ready: list[Outbox] = []

    def wake(self, outbox: Outbox) -> None:
        """Any thread: ``outbox`` looks again for items soon, on the loop."""
        with self._lock:
            self._ready.append(outbox)
            first = len(self._ready) == 1
        if first:
            _call_on_loop(self.loop, self._run)

    def _run(self) -> None:
        with self._lock:
            ready, self._ready = self._ready, []
        for outbox in ready:
            outbox._wake()


def _call_on_loop(loop: asyncio.AbstractEventLoop, callback) -> None:
    try:
        loop.call_soon_threadsafe(callback)
    except RuntimeError:  # the event loop is gone (server shutting down)
        pass
