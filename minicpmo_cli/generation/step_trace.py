"""The LLM engine's decode step on the CPU as one TorchScript call (``torch.jit.trace``), per step key.

Why: an eager step is about a hundred torch ops, and every op lets go of the GIL and must take it back. In a
server the event loop and the request threads run Python between those ops, so under load each step waits
for the GIL a hundred times (measured on the tiny checkpoint: a busy Python thread beside it slowed eager steps
from ~1 ms to ~500 ms; traced steps ran on at ~25 ms, the interpreter taking the GIL back at most a few times
per step). A traced step runs its ops in C++ without the GIL, so the other threads run beside it on another
core, and it also skips Python's per-op cost.

The trace records the same aten ops the eager step calls, on the same shapes (the whole capacity with a mask,
as a CUDA graph): the logits and the KV writes are bit-identical to the eager static-shape step (the JIT's CPU
fuser is off by default, so no op is fused into different arithmetic). One trace per key (batch bucket,
capacity, buffer generation), like a captured graph; the pool's buffers are inputs (written in place), the
weights are constants of the trace (so they must not require grad: the engine only runs inference).
"""

from __future__ import annotations

import logging
import time
import warnings
from typing import Callable

import torch

from minicpmo_cli.errors import describe_error
from minicpmo_cli.generation import forward as fwd
from minicpmo_cli.generation.kv_pool import SlotBuffers

logger = logging.getLogger(__name__)

MAX_TRACES = 32  # traces kept (a key per batch bucket and capacity; old generations are forgotten)


class TracedSteps:
    """Traced decode steps of one LLM, by key; :meth:`run` traces a key on its first call. A step that cannot
    be traced runs eagerly from then on (with the same fixed shapes), after one warning."""

    def __init__(self, llm) -> None:
        self.llm = llm
        self._traces: dict[tuple, Callable] = {}
        self._failed = False

    def run(self, key: tuple, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
            keys: list[torch.Tensor], values: list[torch.Tensor]) -> torch.Tensor:
        """Float32 logits ``[B, V]`` of one step over slots ``[0, B)`` (``fwd.slot_step`` over the whole
        capacity with ``mask``), the new keys/values written into ``keys``/``values``."""
        inputs = (tokens, positions, mask, *keys, *values)
        traced = self._traces.get(key)
        if traced is None and not self._failed:
            traced = self._trace(key, inputs)
        if traced is None:
            return _slot_step(self.llm, len(keys), *inputs)
        with torch.jit.optimized_execution(False):  # the plain recorded graph: no profiling, no fusion
            return traced(*inputs)

    def _trace(self, key: tuple, inputs: tuple) -> Callable | None:
        while len(self._traces) >= MAX_TRACES:
            del self._traces[next(iter(self._traces))]
        llm, layers = self.llm, (len(inputs) - 3) // 2
        started = time.perf_counter()
        try:
            with warnings.catch_warnings(), torch.jit.optimized_execution(False):
                warnings.simplefilter("ignore")  # TorchScript's deprecation notices: a fallback is below
                # tracing runs the step once; the call that follows rewrites the same positions alike
                traced = torch.jit.trace(lambda *args: _slot_step(llm, layers, *args), inputs, check_trace=False)
        except Exception as exc:  # noqa: BLE001 - an op the tracer cannot record: the eager step stays
            logger.warning("the decode step cannot be traced (%s); it runs eagerly", describe_error(exc))
            self._failed = True
            return None
        logger.info("traced the decode step for %s in %.3f s", key, time.perf_counter() - started)
        self._traces[key] = traced
        return traced

    def forget(self, generation: int) -> None:
        """Drop the traces over the buffers of ``generation`` (the pool was replaced)."""
        for key in [k for k in self._traces if k[-1] == generation]:
            del self._traces[key]

    @property
    def traced(self) -> int:
        return len(self._traces)


def _slot_step(llm, layers: int, tokens, positions, mask, *buffers):
    """``fwd.slot_step`` over buffers passed as arguments (a trace's inputs): keys then values, per layer."""
    pool = SlotBuffers(list(buffers[:layers]), list(buffers[layers:]))
    return fwd.slot_step(llm, tokens, positions, pool, mask, mask.shape[-1])
