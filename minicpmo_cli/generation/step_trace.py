"""The LLM engine's decode step on the CPU as one TorchScript call (``torch.jit.trace``), per step key.

Why: an eager step is about a hundred torch ops, and every op lets go of the GIL and must take it back. In a
server the event loop and the request threads run Python between those ops, so under load each step waits
for the GIL a hundred times (measured on the tiny checkpoint: a busy Python thread beside it slowed eager steps
from ~1 ms to ~500 ms; traced steps ran on at ~25 ms, the interpreter taking the GIL back at most a few times
per step). A traced step runs its ops in C++ without the GIL, so the other threads run beside it on another
core, and it also skips Python's per-op cost.

The trace records the same aten ops the eager step calls on the same shapes (a window of ``width`` positions
with a mask, as a CUDA graph does over its capacity): the logits and the KV writes are bit-identical to the
eager step of that form, and the traced graph runs unoptimised (no profiling, no fusion into other
arithmetic). One trace per key (kind of step, batch bucket, attention width); the pool's buffers are inputs,
written in place whatever their slots and capacity, so a pool that grows keeps its traces; the weights are
constants of the trace (so they must not require grad: the engine only runs inference). While a module of
the LLM has forward hooks the step runs eagerly, so that they see every pass.
"""

from __future__ import annotations

import logging
import time
import warnings
from typing import Callable

import torch

from minicpmo_cli.errors import describe_error
from minicpmo_cli.generation import forward as fwd
from minicpmo_cli.generation.kv_pool import SlotBuffers, lengths_mask
from minicpmo_cli.generation.sampling import settle_choice

logger = logging.getLogger(__name__)

MAX_TRACES = 256  # traces kept (a key per kind of step, batch bucket and attention width)
MIN_WIDTH = 64  # the narrowest attention window a step is traced for
WIDTH_QUANTUM = 32  # widths past MIN_WIDTH are multiples of this (or of an eighth of the next power of two)


def attention_width(longest: int, capacity: int) -> int:
    """Key positions a step attends over: at least ``MIN_WIDTH`` and enough for the longest row's new
    position, at most the capacity. Masked positions past the rows' lengths cost as much as filled ones, so a
    step over short rows in a long pool attends over a short window (16 rows in a 1024-position pool: 2.0 ms
    over the whole capacity, 0.67 ms over 128 positions, on the tiny checkpoint). Past ``MIN_WIDTH`` the
    width is rounded up to four widths per power of two (a multiple of an eighth of the next power of two, at
    least ``WIDTH_QUANTUM``): at most a quarter of the window is padding, where a power of two wastes up to
    half (16 rows at position 150: attention over 160 positions, not 256, ~40% less attention time), for at
    most four traces per octave."""
    longest = max(int(longest), 1)
    if longest <= MIN_WIDTH:
        return min(capacity, MIN_WIDTH)
    quantum = max(WIDTH_QUANTUM, (1 << (longest - 1).bit_length()) // 8)
    return min(capacity, -(-longest // quantum) * quantum)


class TracedSteps:
    """Traced decode steps of one LLM, by key; a key is traced on its first call. A step that cannot be
    traced runs eagerly from then on (with the same fixed shapes), after one warning."""

    def __init__(self, llm) -> None:
        self.llm = llm
        self._traces: dict[tuple, Callable] = {}
        self._failed = False
        self._modules = list(llm.modules())

    def run(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
            keys: list[torch.Tensor], values: list[torch.Tensor]) -> torch.Tensor:
        """Float32 logits ``[B, V]`` of one step over slots ``[0, B)`` (``fwd.slot_step`` over the first
        ``mask.shape[-1]`` positions, where ``mask`` says), the new keys/values written into ``keys``/``values``
        """
        key = ("logits", tokens.shape[0], mask.shape[-1])
        return self._call(key, _slot_step, (tokens, positions, mask, *keys, *values), len(keys))

    def greedy(self, width: int, next_ids: torch.Tensor, positions: torch.Tensor, live: torch.Tensor,
               done: torch.Tensor, stops: torch.Tensor, keys: list[torch.Tensor],
               values: list[torch.Tensor]) -> torch.Tensor:
        """One step whose rows all choose greedily, the choice in the same call: the ids ``[B]`` chosen
        (``PAD_ID`` for rows already done), with ``next_ids`` and ``done`` ``[B]`` updated in place for the
        ``live`` rows, as the engine's ``_choose`` does after an argmax (generation/engine.py). The step
        attends over the first ``width`` positions of the buffers."""
        inputs = (next_ids, positions, live, done, stops, *keys, *values)
        return self._call(("greedy", next_ids.shape[0], width), _greedy_step, inputs, len(keys))

    def greedy_penalised(self, width: int, next_ids: torch.Tensor, positions: torch.Tensor, live: torch.Tensor,
                         done: torch.Tensor, stops: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor,
                         keys: list[torch.Tensor], values: list[torch.Tensor]) -> torch.Tensor:
        """:meth:`greedy` with each row's repetition penalty (``penalty`` ``[B, 1]``, 1.0: none) over the ids
        it has chosen (``seen`` ``[B, V]``, updated in place for the ``live`` rows)."""
        inputs = (next_ids, positions, live, done, stops, seen, penalty, *keys, *values)
        key = ("greedy-penalised", next_ids.shape[0], width)
        return self._call(key, _greedy_penalised_step, inputs, len(keys))

    def choose(self, scores: torch.Tensor, next_ids: torch.Tensor, live: torch.Tensor, done: torch.Tensor,
               stops: torch.Tensor, seen: torch.Tensor | None = None,
               penalty: torch.Tensor | None = None) -> torch.Tensor:
        """The greedy choice of :meth:`greedy` (with ``seen`` and ``penalty``: :meth:`greedy_penalised`'s) over
        logits ``scores`` ``[B, V]`` made elsewhere (a prompt's last position), in one call."""
        if seen is None:
            return self._call(("choose", scores.shape[0], 0), _greedy_choice, (scores, next_ids, live, done, stops), 0)
        inputs = (scores, next_ids, live, done, stops, seen, penalty)
        return self._call(("choose-penalised", scores.shape[0], 0), _greedy_penalised_choice, inputs, 0)

    def _call(self, key: tuple, fn: Callable, inputs: tuple, layers: int) -> torch.Tensor:
        """``fn(llm, layers, width, *inputs)``, traced per ``key`` = (kind, batch, width)."""
        traced = None
        if not fwd.any_hooked(self._modules):  # a trace would run hooks only while tracing: the step runs eagerly
            traced = self._traces.get(key)
            if traced is None and not self._failed:
                traced = self._trace(key, fn, inputs, layers)
        if traced is None:
            return fn(self.llm, layers, key[2], *inputs)
        with torch.jit.optimized_execution(False):  # the plain recorded graph: no profiling, no fusion
            return traced(*inputs)

    def _trace(self, key: tuple, fn: Callable, inputs: tuple, layers: int) -> Callable | None:
        while len(self._traces) >= MAX_TRACES:
            del self._traces[next(iter(self._traces))]
        llm, width = self.llm, key[2]
        started = time.perf_counter()
        try:
            with warnings.catch_warnings(), torch.jit.optimized_execution(False):
                warnings.simplefilter("ignore")  # TorchScript's deprecation notices: a fallback is below
                # tracing runs the step once: on copies of the ids and flags it updates in place (the call
                # that follows reads the originals); its KV writes are the ones the call then rewrites
                traced = torch.jit.trace(lambda *args: fn(llm, layers, width, *args), _scratch(inputs, layers),
                                         check_trace=False)
        except Exception as exc:  # noqa: BLE001 - an op the tracer cannot record: the eager step stays
            logger.warning("the decode step cannot be traced (%s); it runs eagerly", describe_error(exc))
            self._failed = True
            return None
        logger.info("traced the %s step for %s in %.3f s", key[0], key[1:], time.perf_counter() - started)
        self._traces[key] = traced
        return traced

    @property
    def traced(self) -> int:
        return len(self._traces)


def _slot_step(llm, layers: int, width: int, tokens, positions, mask, *buffers):
    """``fwd.slot_step`` over the first ``width`` positions of buffers passed as arguments (a trace's inputs):
    keys then values, per layer."""
    pool = SlotBuffers(list(buffers[:layers]), list(buffers[layers:]))
    return fwd.slot_step(llm, tokens, positions, pool, mask, width)


def _greedy_step(llm, layers: int, width: int, next_ids, positions, live, done, stops, *buffers):
    """:func:`_slot_step` and the engine's greedy choice (``RowSampling.choose`` without penalty or ban is
    the argmax; then what ``sampling.settle_choice`` keeps of it), in one call."""
    mask = lengths_mask(positions, width)
    scores = _slot_step(llm, layers, width, next_ids, positions, mask, *buffers)
    return _greedy_choice(llm, layers, width, scores, next_ids, live, done, stops)


def _greedy_penalised_step(llm, layers: int, width: int, next_ids, positions, live, done, stops, seen, penalty,
                           *buffers):
    """:func:`_greedy_step` with ``RowSampling.choose``'s repetition penalty before the argmax and the seen
    ids updated after it."""
    mask = lengths_mask(positions, width)
    scores = _slot_step(llm, layers, width, next_ids, positions, mask, *buffers)
    return _greedy_penalised_choice(llm, layers, width, scores, next_ids, live, done, stops, seen, penalty)


def _greedy_choice(llm, layers: int, width: int, scores, next_ids, live, done, stops):
    return settle_choice(torch.argmax(scores, dim=-1), next_ids, live, done, stops)


def _greedy_penalised_choice(llm, layers: int, width: int, scores, next_ids, live, done, stops, seen, penalty):
    penalised = torch.where(scores < 0, scores * penalty, scores / penalty)
    chosen = torch.argmax(torch.where(seen, penalised, scores), dim=-1)
    return settle_choice(chosen, next_ids, live, done, stops, seen)


def _scratch(inputs: tuple, layers: int) -> tuple:
    """``inputs`` with the small tensors a step may update in place (ids, flags) copied: what tracing runs on."""
    small = len(inputs) - 2 * layers
    return tuple(x.clone() for x in inputs[:small]) + tuple(inputs[small:])
