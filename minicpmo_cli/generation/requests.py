"""What a caller of the LLM engine (generation/engine.py) holds: the :class:`Request` it submits, the
:class:`Handle` it gets back (ids as they come, the result, why it finished, timings), the engine's counters
(:class:`EngineStats`) and the two refusals made before any memory is taken."""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from minicpmo_cli.errors import UsageError
from minicpmo_cli.generation.settings import DecodeSettings, cut_at_stop

# A handle aborts through the engine that runs it (generation/engine.py LLMEngine, which imports this module:
# typed loosely here so that the import goes one way only).
LLMEngine = Any


class ContextTooLong(UsageError):
    """The prompt plus ``max_new_tokens`` does not fit the model's context."""


class EngineFull(UsageError):
    """The waiting queue is at its limit (the server answers 429)."""


@dataclass
class Request:
    embeds: torch.Tensor  # [L, D], one unpadded prompt row on the engine's device and dtype
    settings: DecodeSettings
    seed: int | None = None  # a private generator: the same answer alone or in any batch
    on_prefill: Callable[[torch.Tensor], None] | None = None  # the prompt's final-norm hidden states [L, D]
    on_tokens: Callable[[list[int]], None] | None = None  # on the engine thread, as ids are chosen
    stream: bool = False  # read ids back every step (also implied by on_tokens)
    generator: torch.Generator | None = None  # a caller's own generator (shared rows draw in row order)


@dataclass
class Timings:
    submitted: float = 0.0
    first_token: float | None = None
    finished: float | None = None


@dataclass
class EngineStats:
    running: int = 0
    waiting: int = 0
    slots_used: int = 0
    slots_total: int = 0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    kv_bytes: int = 0  # what the KV slots take now
    kv_budget_bytes: int | None = None  # what they may take (None: no budget)


_END = object()


class Handle:
    """A submitted request: :meth:`tokens` (ids as decoded), :meth:`result` (all ids, cut at the stop id),
    ``finish_reason`` ('stop' | 'length' | 'abort' | 'error'), ``error``, ``timings``."""

    def __init__(self, engine: LLMEngine, request: Request) -> None:
        self.engine, self.request = engine, request
        self.ids: list[int] = []
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self.timings = Timings(submitted=time.monotonic())
        self._queue: queue.Queue = queue.Queue()
        self._done = threading.Event()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def _wait(self, event_check: Callable[[], bool], timeout: float | None = None) -> None:
        if self.engine.threaded:
            return
        while not event_check():  # a short-lived engine: the waiter steps it
            if not self.engine.step() and not event_check():
                raise RuntimeError("the engine went idle before the request finished")

    def tokens(self) -> Iterator[int]:
        """Ids as they are decoded (blocks); ends when the request finishes."""
        while True:
            if not self.engine.threaded:
                self._wait(lambda: not self._queue.empty())
            item = self._queue.get()
            if item is _END:
                self._queue.put(_END)  # a second iteration ends at once too
                return
            yield from item

    def batches(self) -> Iterator[list[int]]:
        """Ids as they are decoded, each time every id chosen since the last (blocks for the first): one
        wakeup of the reader per batch, not per id. Ends when the request finishes."""
        while True:
            if not self.engine.threaded:
                self._wait(lambda: not self._queue.empty())
            items = [self._queue.get()]
            while True:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            ended = _END in items
            ids = [token for batch in (items[:items.index(_END)] if ended else items) for token in batch]
            if ids:
                yield ids
            if ended:
                self._queue.put(_END)  # a second iteration ends at once too
                return

    def result(self) -> list[int]:
        self._wait(self._done.is_set)
        self._done.wait()
        if self.error is not None:
            raise self.error
        return cut_at_stop(self.ids, self.request.settings.stop_ids)

    def _record(self, tokens: list[int]) -> None:
        """Chosen ids, read back (the engine hands them to readers with :meth:`_deliver`)."""
        if self.timings.first_token is None and tokens:
            self.timings.first_token = time.monotonic()
        self.ids.extend(tokens)

    def _deliver(self, tokens: list[int]) -> None:
        """Hand ids to the reader: one queue item, one wakeup."""
        self._queue.put(tokens)

    def _finish(self, reason: str, error: BaseException | None = None) -> None:
        if self._done.is_set():
            return
        self.finish_reason, self.error = reason, error
        self.timings.finished = time.monotonic()
        self._queue.put(_END)
        self._done.set()
