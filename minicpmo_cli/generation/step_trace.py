"""The LLM engine's decode step on the CPU as one TorchScript call (``torch.jit.trace``), per step key.

Why: an eager step is about a hundred torch ops, and every op lets go of the GIL and must take it back. In a
server the event loop and the request threads run Python between those ops, so under load each step waits
for the GIL a hundred times (measured on the tiny checkpoint: a busy Python thread beside it slowed eager steps
from ~1 ms to ~500 ms; traced steps ran on at ~25 ms, the interpreter taking the GIL back at most a few times
per step). A traced step runs its ops in C++ without the GIL, so the other threads run beside it on another
core, and it also skips Python's per-op cost.

The trace records the same aten ops the eager step calls, and runs them on the shapes of each call: the batch
and the attention window are sizes of its inputs (the window: ``arange(width)``), which the tracer records as
such, so one trace per kind of step serves every batch and every window, with no trace to make mid-run when a
batch or a row's length is new (each took 20-60 ms of the engine thread on the tiny checkpoint), and a step
attends over exactly the longest row's positions (masked positions cost as much as filled ones: 16 rows at
position 150 took ~60% longer over a window of 256 positions, 16 rows in a 1024-position pool 2.0 ms over the
whole capacity and 0.67 ms over 128 positions). The logits and KV writes are bit-identical
to the eager step over the same window (tested over batches and windows other than the traced ones), and the
traced graph runs unoptimised (no profiling, no fusion into other arithmetic). The pool's buffers are inputs,
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
from minicpmo_cli.generation.kv_pool import SlotBuffers, window_mask
from minicpmo_cli.generation.sampling import settle_choice

logger = logging.getLogger(__name__)

class TracedSteps:
    """Traced decode steps of one LLM, one per kind of step, traced on its first call (any batch and window
    then). A step that cannot be traced runs eagerly from then on (with the same shapes), after one warning."""

    def __init__(self, llm) -> None:
        self.llm = llm
        self._traces: dict[str, Callable] = {}
        self._failed = False
        self._modules = list(llm.modules())
        self._window = torch.arange(0)  # key positions 0, 1, ...: a step's window is a slice of them

    def window(self, width: int, device) -> torch.Tensor:
        """``arange(width)`` on ``device`` (a view of one kept tensor, grown when a wider window comes)."""
        if self._window.shape[0] < width or self._window.device != torch.device(device):
            self._window = torch.arange(max(width, 2 * self._window.shape[0]), device=device)
        return self._window[:width]

    def run(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
            keys: list[torch.Tensor], values: list[torch.Tensor]) -> torch.Tensor:
        """Float32 logits ``[B, V]`` of one step over slots ``[0, B)`` (``fwd.slot_step`` over the first
        ``mask.shape[-1]`` positions, where ``mask`` says), the new keys/values written into ``keys``/``values``
        """
        return self._call("logits", _slot_step, (tokens, positions, mask, *keys, *values), len(keys))

    def greedy(self, width: int, next_ids: torch.Tensor, positions: torch.Tensor, live: torch.Tensor,
               done: torch.Tensor, stops: torch.Tensor, keys: list[torch.Tensor],
               values: list[torch.Tensor]) -> torch.Tensor:
        """One step whose rows all choose greedily, the choice in the same call: the ids ``[B]`` chosen
        (``PAD_ID`` for rows already done), with ``next_ids`` and ``done`` ``[B]`` updated in place for the
        ``live`` rows, as the engine's ``_choose`` does after an argmax (generation/engine.py). The step
        attends over the first ``width`` positions of the buffers."""
        inputs = (next_ids, positions, live, done, stops, self.window(width, positions.device), *keys, *values)
        return self._call("greedy", _greedy_step, inputs, len(keys))

    def greedy_penalised(self, width: int, next_ids: torch.Tensor, positions: torch.Tensor, live: torch.Tensor,
                         done: torch.Tensor, stops: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor,
                         keys: list[torch.Tensor], values: list[torch.Tensor]) -> torch.Tensor:
        """:meth:`greedy` with each row's repetition penalty (``penalty`` ``[B, 1]``, 1.0: none) over the ids
        it has chosen (``seen`` ``[B, V]``, updated in place for the ``live`` rows)."""
        inputs = (next_ids, positions, live, done, stops, seen, penalty, self.window(width, positions.device),
                  *keys, *values)
        return self._call("greedy-penalised", _greedy_penalised_step, inputs, len(keys))

    def choose(self, scores: torch.Tensor, next_ids: torch.Tensor, live: torch.Tensor, done: torch.Tensor,
               stops: torch.Tensor, seen: torch.Tensor | None = None,
               penalty: torch.Tensor | None = None) -> torch.Tensor:
        """The greedy choice of :meth:`greedy` (with ``seen`` and ``penalty``: :meth:`greedy_penalised`'s) over
        logits ``scores`` ``[B, V]`` made elsewhere (a prompt's last position), in one call."""
        if seen is None:
            return self._call("choose", _greedy_choice, (scores, next_ids, live, done, stops), 0)
        inputs = (scores, next_ids, live, done, stops, seen, penalty)
        return self._call("choose-penalised", _greedy_penalised_choice, inputs, 0)

    def _call(self, key: str, fn: Callable, inputs: tuple, layers: int) -> torch.Tensor:
        """``fn(llm, layers, *inputs)``, traced once per kind of step ``key``."""
        traced = None
        if not fwd.any_hooked(self._modules):  # a trace would run hooks only while tracing: the step runs eagerly
            traced = self._traces.get(key)
            if traced is None and not self._failed:
                traced = self._trace(key, fn, inputs, layers)
        if traced is None:
            return fn(self.llm, layers, *inputs)
        with torch.jit.optimized_execution(False):  # the plain recorded graph: no profiling, no fusion
            return traced(*inputs)

    def _trace(self, key: str, fn: Callable, inputs: tuple, layers: int) -> Callable | None:
        llm = self.llm
        started = time.perf_counter()
        try:
            with warnings.catch_warnings(), torch.jit.optimized_execution(False):
                warnings.simplefilter("ignore")  # TorchScript's deprecation notices: a fallback is below
                # tracing runs the step once: on copies of the ids and flags it updates in place (the call
                # that follows reads the originals); its KV writes are the ones the call then rewrites
                traced = torch.jit.trace(lambda *args: fn(llm, layers, *args), _scratch(inputs, layers),
                                         check_trace=False)
        except Exception as exc:  # noqa: BLE001 - an op the tracer cannot record: the eager step stays
            logger.warning("the decode step cannot be traced (%s); it runs eagerly", describe_error(exc))
            self._failed = True
            return None
        logger.info("traced the %s step in %.3f s", key, time.perf_counter() - started)
        self._traces[key] = traced
        return traced

    @property
    def traced(self) -> int:
        return len(self._traces)


def _slot_step(llm, layers: int, tokens, positions, mask, *buffers):
    """``fwd.slot_step`` over the first ``mask.shape[-1]`` positions of buffers passed as arguments (a trace's
    inputs): keys then values, per layer."""
    pool = SlotBuffers(list(buffers[:layers]), list(buffers[layers:]))
    return fwd.slot_step(llm, tokens, positions, pool, mask, mask.shape[-1])


def _greedy_step(llm, layers: int, next_ids, positions, live, done, stops, window, *buffers):
    """:func:`_slot_step` over the positions of ``window`` (``arange(width)``) and the engine's greedy choice
    (``RowSampling.choose`` without penalty or ban is the argmax; then what ``sampling.settle_choice`` keeps of
    it), in one call."""
    scores = _slot_step(llm, layers, next_ids, positions, window_mask(positions, window), *buffers)
    return _greedy_choice(llm, layers, scores, next_ids, live, done, stops)


def _greedy_penalised_step(llm, layers: int, next_ids, positions, live, done, stops, seen, penalty, window,
                           *buffers):
    """:func:`_greedy_step` with ``RowSampling.choose``'s repetition penalty before the argmax and the seen
    ids updated after it."""
    scores = _slot_step(llm, layers, next_ids, positions, window_mask(positions, window), *buffers)
    return _greedy_penalised_choice(llm, layers, scores, next_ids, live, done, stops, seen, penalty)


def _greedy_choice(llm, layers: int, scores, next_ids, live, done, stops):
    return settle_choice(torch.argmax(scores, dim=-1), next_ids, live, done, stops)


def _greedy_penalised_choice(llm, layers: int, scores, next_ids, live, done, stops, seen, penalty):
    penalised = torch.where(scores < 0, scores * penalty, scores / penalty)
    chosen = torch.argmax(torch.where(seen, penalised, scores), dim=-1)
    return settle_choice(chosen, next_ids, live, done, stops, seen)


def _scratch(inputs: tuple, layers: int) -> tuple:
    """``inputs`` with the small tensors a step may update in place (ids, flags) copied: what tracing runs on."""
    small = len(inputs) - 2 * layers
    return tuple(x.clone() for x in inputs[:small]) + tuple(inputs[small:])
