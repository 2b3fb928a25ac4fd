"""The LLM engine: many requests decoded together in KV slots (vLLM's split between scheduling and tensors).

- :class:`Request` (generation/requests.py, as :class:`Handle`): one unpadded prompt row (embeddings
  ``[L, D]``), its own ``DecodeSettings``, seed and callbacks; :meth:`LLMEngine.submit` returns a
  :class:`Handle` (ids as they come, the result, the reason it finished, timings).
- A step (:meth:`LLMEngine.step`): schedule (free the slots of aborted and finished requests, admit waiting
  requests into free slots, prefill them, in chunks when a prompt is long so running rows keep decoding) ->
  run one step for all decoding rows (generation/step_runner.py) -> sample each row with its own settings
  and generator (generation/sampling.py ``RowSampling``) -> hand the ids over.
- Ids are read back to the host every ``CHECK_EVERY`` steps (the only host reads of a non-streaming decode),
  or while requests stream every step for a few of them, every few steps for many (``stream_interval``; a
  stream's first id at once). A row that stopped in between keeps decoding pads until the
  read: its ids after the stop are dropped, as ``generate`` pads a finished row.

A background thread steps while there is work (``threaded=True``, started on the first submit); a
short-lived engine (the library path, ``threaded=False``) is stepped by whoever waits on a handle.
Beam search is not here (generation/text.py routes it to transformers ``generate``).
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
import weakref
from typing import Callable

import torch

from minicpmo_cli.errors import UsageError
from minicpmo_cli.generation import forward as fwd
from minicpmo_cli.generation.kv_budget import check_fits, position_bytes, slots_within
from minicpmo_cli.generation.engine_outputs import (CHECK_EVERY, STREAM_PERIOD_S, EngineOutputs,
                                                    stream_interval)
from minicpmo_cli.generation.engine_prefill import EnginePrefill
from minicpmo_cli.generation.kv_pool import KVPool, lengths_mask, slot_bucket
from minicpmo_cli.generation.prefill_script import ScriptedPrefill
from minicpmo_cli.generation.requests import ContextTooLong, EngineFull, EngineStats, Handle, Request
from minicpmo_cli.generation.scheduler import MAX_WAITING, Row, Scheduler
from minicpmo_cli.generation.sampling import RowSampling, settle_choice
from minicpmo_cli.generation.static_cache import bucket_length
from minicpmo_cli.generation.step_runner import StepRunner
from minicpmo_cli.generation.step_trace import TracedSteps

__all__ = ["CHECK_EVERY", "ContextTooLong", "EngineFull", "EngineStats", "Handle", "LLMEngine", "Request",
           "Scheduler", "stream_interval"]

logger = logging.getLogger(__name__)

LINGER_S = 2.0  # an idle engine thread waits this long for the next request before it ends
PREFILL_CHUNK = 2048  # prompt positions prefilled per step: longer prompts are prefilled over several steps


class LLMEngine(EnginePrefill, EngineOutputs):
    """Continuous batching of LLM requests over a :class:`KVPool`; see the module docstring (prefill:
    generation/engine_prefill.py; read-back and delivery of the ids: generation/engine_outputs.py)."""

    def __init__(self, llm, *, runner: StepRunner | None = None, max_batch: int = 16, threaded: bool = True,
                 max_waiting: int = MAX_WAITING, prefill_chunk: int = PREFILL_CHUNK,
                 check_every: int = CHECK_EVERY, context: int | None = None, kv_budget: int | None = None,
                 threads: int | None = None, stream_period: float = STREAM_PERIOD_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.llm = llm
        self.stream_period, self.clock = float(stream_period), clock  # see _deliver
        self.threads = threads  # torch intra-op threads of the engine thread (None: torch's default)
        self.kv_budget = None if kv_budget is None else int(kv_budget)  # bytes the KV slots may take (None: any)
        self.position_bytes = position_bytes(llm.config, llm.lm_head.weight.element_size())
        self.runner = runner if runner is not None else StepRunner("eager")
        self.traced = self.scripted_prefill = None
        if self.runner.mode == "trace":
            llm.requires_grad_(False)  # a trace holds the weights as constants, which must not require grad
            self.traced, self.scripted_prefill = TracedSteps(llm), ScriptedPrefill(llm)
        self.max_batch, self.threaded = slot_bucket(max_batch), threaded
        self.prefill_chunk, self.check_every = int(prefill_chunk), int(check_every)
        self.context = int(context or getattr(llm.config, "max_position_embeddings", 32768))
        self.scheduler = Scheduler(max_waiting)
        self.pool: KVPool | None = None
        self.stats_ = EngineStats()
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._aborts: list[Handle] = []
        self._thread: threading.Thread | None = None
        self._closed = False
        if threaded:
            atexit.register(_close_at_exit, weakref.ref(self))
        self._pending: list[tuple[torch.Tensor, list[Row]]] = []  # chosen ids not yet read back
        self._masks: tuple = (None, None, None)  # (key, live, penalty) of the last decode step
        self._seen: torch.Tensor | None = None
        self._stops: torch.Tensor | None = None
        self._logits: torch.Tensor | None = None
        self._next: torch.Tensor | None = None  # [slots] the id each slot feeds at its next step
        self._done: torch.Tensor | None = None  # [slots] stopped on the device (not yet read back)

    # ----- any thread ---------------------------------------------------------------------------------

    def submit(self, request: Request) -> Handle:
        settings = request.settings
        if settings.beam_search:
            raise UsageError("beam search is not done by the engine (use transformers generate)")
        length = int(request.embeds.shape[0])
        if length < 1:
            raise UsageError("the prompt is empty")
        if length + settings.max_new_tokens > self.context:
            raise ContextTooLong(f"the prompt ({length} tokens) plus max_new_tokens ({settings.max_new_tokens}) "
                                 f"is beyond the model's context of {self.context} tokens",
                                 parameters=("max_new_tokens",))
        check_fits(self.kv_budget, self.position_bytes, length, settings.max_new_tokens)
        handle = Handle(self, request)
        with self._work:
            self.scheduler.add(handle)
            self._work.notify()
            if self._closed:
                raise UsageError("the engine is closed")
            if self.threaded and self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="minicpmo-engine", daemon=True)
                self._thread.start()
        return handle

    def abort(self, handle: Handle) -> None:
        with self._work:
            self._aborts.append(handle)
            self._work.notify()

    def stats(self) -> EngineStats:
        with self._lock:
            stats = EngineStats(**vars(self.stats_))
            stats.running = len(self.scheduler.running)
            stats.waiting = len(self.scheduler.waiting)
            stats.slots_used = len(self.scheduler.running)
            stats.slots_total = self.pool.slots if self.pool is not None else 0
            stats.kv_bytes = self.pool_bytes(self.pool.slots, self.pool.capacity) if self.pool is not None else 0
            stats.kv_budget_bytes = self.kv_budget
        return stats

    @property
    def idle(self) -> bool:
        return not self.scheduler.waiting and not self.scheduler.running and not self._aborts

    def _loop(self) -> None:
        """Step while there is work; once idle the thread waits ``LINGER_S`` for more (a thread start costs
        milliseconds, and torch's intra-op threads are per calling thread) and then ends (a later submit starts
        another), so none is left running at interpreter exit (see :meth:`close`)."""
        if self.threads is not None:
            torch.set_num_threads(self.threads)  # this thread's own setting (OpenMP's is per calling thread)
        while True:
            with self._work:
                if self.idle and not self._closed:
                    self._work.wait(LINGER_S)
                if self.idle:
                    self._thread = None
                    self._work.notify_all()
                    return
            self.step()

    def close(self) -> None:
        """Wait for the engine thread to end (requests in flight are finished first); called at exit."""
        with self._work:
            self._closed = True
            self._work.notify_all()  # a lingering thread ends now
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=30)

    # ----- the engine thread --------------------------------------------------------------------------

    def step(self) -> bool:
        """One schedule -> run -> sample -> update; False when there was nothing to do."""
        with torch.inference_mode():
            try:
                return self._step()
            except Exception as exc:  # noqa: BLE001 - every request in flight learns of it
                logger.debug("engine step failed", exc_info=True)
                self._fail_all(exc)
                return True

    def _step(self) -> bool:
        self._take_aborts()
        self._admit()
        if not self.scheduler.running:
            return False
        decoding = self.scheduler.decoding()
        if not decoding or self._greedy_in_trace(decoding):
            # new prompts first, their first ids chosen (and read back when due) before the running rows' step:
            # a 1-token request is done, and a stream's first token out, a step sooner; the step's writes to
            # their slots land past their prompts, where their first decode step writes before it attends
            prefilled = self._prefill_step()
            if prefilled:
                self._choose(self._prefilled_logits(None, prefilled), [row for row, _ in prefilled])
                if self._must_read():
                    self._read_back()  # may finish rows: those that ended leave this step
                    decoding = [row for row in decoding if self.scheduler.running.get(row.slot) is row]
            if decoding:
                self._decode_greedy(decoding)
        else:  # sampled rows: one choice over them all (rows sharing torch's generator draw in row order)
            logits = self._decode(decoding)
            prefilled = self._prefill_step()
            self._choose(self._prefilled_logits(logits, prefilled), decoding + [row for row, _ in prefilled])
        if self._must_read():
            self._read_back()
        return True

    def _take_aborts(self) -> None:
        with self._lock:
            aborts, self._aborts = self._aborts, []
        for handle in aborts:
            if handle in self.scheduler.waiting:
                self.scheduler.waiting.remove(handle)
                handle._finish("abort")
                continue
            for slot, row in list(self.scheduler.running.items()):
                if row.handle is handle:
                    self._release(row, "abort")

    def _admit(self) -> None:
        admitted = []
        while True:
            with self._lock:
                if not self.scheduler.waiting:
                    break
                handle = self.scheduler.waiting[0]
            needed = handle.request.embeds.shape[0] + handle.request.settings.max_new_tokens
            if not self._make_room(needed):
                break
            with self._lock:
                self.scheduler.waiting.popleft()
            slot = self.pool.alloc()
            row = Row(handle, slot, generator=_generator(handle.request))
            self.scheduler.running[slot] = row
            admitted.append(row)
            self.stats_.prompt_tokens_total += row.prompt_length
        self._reset_slots(admitted)

    def _make_room(self, needed: int) -> bool:
        """A free slot with room for ``needed`` positions: a new pool (the next bucket) when this one has no
        free slot below ``max_batch`` or is too short; False when the batch is full, or when growing would
        pass the KV budget (the request waits for running ones to end; an idle pool is made anew)."""
        pool = self.pool
        if pool is None:
            capacity = bucket_length(needed)
            wanted = slot_bucket(min(self.max_batch, len(self.scheduler.waiting)))
            slots = slots_within(self.kv_budget, self.position_bytes, wanted, capacity)
            llm = self.llm
            weight = llm.lm_head.weight
            self.pool = KVPool.empty(llm.config, slots, capacity, weight.dtype, weight.device)
            self._buffers()
            return True
        if pool.free_slots and pool.fits(needed):
            return True
        used = pool.slots - pool.free_slots
        if used + 1 > self.max_batch:
            return False
        slots = min(self.max_batch, used + len(self.scheduler.waiting))  # room for the queue at once
        if self.kv_budget is not None:
            if used == 0:  # nothing to keep: the old buffers go before the new ones are made
                self._drop_pool()
                return self._make_room(needed)
            capacity = max(pool.capacity, bucket_length(needed))
            reserve = self.pool_bytes(pool.slots, pool.capacity)  # old and new exist while rows are copied
            wanted = max(pool.slots, slot_bucket(slots))
            slots = slots_within(self.kv_budget, self.position_bytes, wanted, capacity, reserve)
            if slots < pool.slots or slots <= used:
                return False
        if self._pending:
            self._read_back()  # the ids chosen so far go with the old buffers' rows
        self.pool = pool.grown(slots, needed)
        self.runner.forget(pool.generation)  # traced steps take the buffers as inputs: they stay
        self._buffers(previous=pool.slots)
        return True

    def pool_bytes(self, slots: int, capacity: int) -> int:
        return slots * capacity * self.position_bytes

    def _drop_pool(self) -> None:
        if self._pending:
            self._read_back()
        self.runner.forget(self.pool.generation)
        self.pool = None
        self._next = self._done = self._stops = self._logits = self._seen = None

    def _buffers(self, previous: int = 0) -> None:
        """Per-slot device state sized to the pool (kept for the slots that exist already)."""
        slots, device = self.pool.slots, self.pool.keys[0].device
        vocab = self.llm.lm_head.weight.shape[0]

        def grow(old, fresh):
            if old is not None and previous:
                fresh[:previous] = old[:previous]
            return fresh

        self._next = grow(self._next, torch.zeros(slots, dtype=torch.long, device=device))
        self._done = grow(self._done, torch.zeros(slots, dtype=torch.bool, device=device))
        self._stops = grow(self._stops, torch.zeros(slots, vocab, dtype=torch.bool, device=device))
        self._logits = grow(self._logits, torch.zeros(slots, vocab, dtype=torch.float32, device=device))
        if self._seen is not None:
            self._seen = grow(self._seen, torch.zeros(slots, vocab, dtype=torch.bool, device=device))

    def _reset_slots(self, rows: list[Row]) -> None:
        """The per-slot state of newly admitted rows: not done, their own stop ids, nothing seen (a few ops for
        them all: each op lets go of the GIL, which a busy server may take a switch interval to give back).
        After the pool's growth, if any: growth copies the old slots' state, junk for new rows."""
        if not rows:
            return
        device = self._stops.device
        slots = torch.tensor([row.slot for row in rows], device=device)
        self._done.index_fill_(0, slots, False)
        self._stops.index_fill_(0, slots, False)
        stops = [(row.slot, token) for row in rows for token in row.request.settings.stop_ids]
        if stops:
            at = torch.tensor(stops, dtype=torch.long, device=device)
            self._stops[at[:, 0], at[:, 1]] = True
        if self._seen is None and any(row.request.settings.repetition_penalty != 1.0 for row in rows):
            self._seen = torch.zeros_like(self._stops)
        if self._seen is not None:
            self._seen.index_fill_(0, slots, False)

    # ----- decode -------------------------------------------------------------------------------------

    def _decode(self, rows: list[Row]) -> torch.Tensor:
        """One step over slots ``[0, span)``; float32 logits ``[span, V]`` (rows of other slots: junk)."""
        pool = self.pool
        span, lengths, positions = self._step_positions()
        device = positions.device
        decoding = {row.slot for row in rows}
        tokens = self._next[:span]
        if self.traced is not None:
            mask = lengths_mask(positions, max(lengths) + 1)  # the longest row's window (step_trace.py)
            logits = self.traced.run(tokens, positions, mask, pool.keys, pool.values)
        elif self.runner.static_shapes or device.type == "cuda":
            mask = lengths_mask(positions, pool.capacity)
            if self.runner.mode == "compile" and device.type == "cuda":
                pool.mark_static()  # CUDA graphs of reduce-overhead replay over the slots in place
            key = (span, pool.capacity, pool.generation)
            logits = self.runner.run(key, _slot_step, (tokens, positions, mask),
                                     (self.llm, pool, pool.capacity))
        else:
            uniform = len(set(lengths)) == 1 and len(decoding) == span
            width = max(lengths) + 1
            mask = None if uniform else lengths_mask(positions, width)
            logits = fwd.slot_step(self.llm, tokens, positions, pool, mask, width)
        for row in rows:
            pool.lengths[row.slot] += 1
        return logits

    def _greedy_in_trace(self, rows: list[Row]) -> bool:
        """Whether this step's choice can run inside the traced step: every row greedy and none with its stop
        ids banned yet (min_new_tokens); then the choice is the argmax after each row's repetition penalty,
        and nothing else in ``_choose`` applies."""
        if self.traced is None:
            return False
        return all(row.sampled >= row.greedy_from for row in rows)

    def _decode_greedy(self, rows: list[Row]) -> None:
        """One traced step over slots ``[0, span)`` with the greedy choice in it (step_trace.py
        ``TracedSteps.greedy``): the same ids as ``_decode`` + ``_choose``, a handful of host calls in all."""
        pool = self.pool
        span, lengths, positions = self._step_positions()
        width = max(lengths) + 1  # attend over the longest row's positions and no more (step_trace.py)
        live, penalty = self._decode_masks(span, rows)
        state = (self._next[:span], positions, live, self._done[:span], self._stops[:span])
        if penalty is None:
            tokens = self.traced.greedy(width, *state, pool.keys, pool.values)
        else:
            tokens = self.traced.greedy_penalised(width, *state, self._seen[:span], penalty, pool.keys, pool.values)
        for row in rows:
            pool.lengths[row.slot] += 1
        self._chosen(tokens, rows)

    def _decode_masks(self, span: int, rows: list[Row]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The live mask and (with a seen table) the penalties of the decoding ``rows``, made again only when
        they changed (a row joined or left, or the span moved): most steps reuse the last ones."""
        key = (span, self._seen is not None, tuple((row.slot, row.request.settings.repetition_penalty)
                                                   for row in rows))
        if self._masks[0] != key:
            penalty = None if self._seen is None else self._penalties(span, rows)
            self._masks = (key, self._live(span, rows), penalty)
        return self._masks[1], self._masks[2]

    def _penalties(self, span: int, rows: list[Row]) -> torch.Tensor:
        """float32 ``[span, 1]``: each row's repetition penalty at its slot (1.0, none, elsewhere)."""
        penalty = [[1.0] for _ in range(span)]
        for row in rows:
            penalty[row.slot][0] = row.request.settings.repetition_penalty
        return torch.tensor(penalty, dtype=torch.float32, device=self._next.device)

    def _step_positions(self) -> tuple[int, list[int], torch.Tensor]:
        """(span, each slot's position, the positions on the device) of a decode step over slots ``[0, span)``.
        A slot that does not decode this step writes at its own next position (a free slot's, or the next one
        a prompt chunk will overwrite), never over filled positions."""
        pool = self.pool
        span, last = pool.span(), pool.capacity - 1
        lengths = [length if length < last else last for length in pool.lengths[:span]]
        return span, lengths, torch.tensor(lengths, dtype=torch.long, device=self._next.device)

    def _live(self, span: int, rows: list[Row]) -> torch.Tensor:
        """bool ``[span]``: the slots of ``rows`` (the ones that take this step's id)."""
        live = [False] * span
        for row in rows:
            live[row.slot] = True
        return torch.tensor(live, device=self._next.device)

    def _chosen(self, tokens: torch.Tensor, rows: list[Row]) -> None:
        """``rows`` took their ids of this step (``tokens``, read back later)."""
        for row in rows:
            row.sampled += 1
            row.decoding = True
        self._pending.append((tokens, rows))

    def _choose(self, logits: torch.Tensor, rows: list[Row]) -> None:
        span = logits.shape[0]
        if self._greedy_in_trace(rows):  # one traced call (a new prompt's first id, with greedy decoding)
            state = (self._next[:span], self._live(span, rows), self._done[:span], self._stops[:span])
            seen = None if self._seen is None else self._seen[:span]
            penalty = None if seen is None else self._penalties(span, rows)
            self._chosen(self.traced.choose(logits, *state, seen, penalty), rows)
            return
        by_slot = {row.slot: row for row in rows}
        params = [None] * span
        for slot, row in by_slot.items():
            params[slot] = (row.request.settings, row.sampled, row.generator)
        sampler = RowSampling(params, self._seen, self._stops, logits.device)
        seen = None if self._seen is None else self._seen[:span]
        tokens = settle_choice(sampler.choose(logits), self._next[:span], self._live(span, rows),
                               self._done[:span], self._stops[:span], seen)
        self._chosen(tokens, rows)

def _slot_step(tokens, positions, mask, llm, pool, span):
    """:func:`forward.slot_step` with the runner's argument order (inputs first, then what a key pins)."""
    return fwd.slot_step(llm, tokens, positions, pool, mask, span)


def _close_at_exit(ref) -> None:
    engine = ref()
    if engine is not None:
        engine.close()


def _generator(request: Request) -> torch.Generator | None:
    if request.generator is not None:
        return request.generator
    if request.seed is None:
        return None
    device = request.embeds.device
    return torch.Generator(device=device).manual_seed(int(request.seed))
