"""Step runners: how one decode step (LLM token or TTS audio frame) runs, chosen once when the engine loads.

- ``eager``: the step function called as it is.
- ``trace`` (the CPU default): as eager, except the LLM engine's decode step, which it runs as one TorchScript
  call per key (generation/step_trace.py: no GIL held while the step's ops run, bit-identical to eager).
- ``graph``: ``torch.cuda.CUDAGraph`` capture of the same eager function, once per key (batch bucket,
  capacity bucket, buffer generation); every later call copies its inputs into the captured static input
  tensors (``copy_``) and replays. The same kernels on the same values: bit-identical to eager on the same
  device. The CUDA default.
- ``compile``: the step function under ``torch.compile`` (CUDA graphs through ``reduce-overhead`` on CUDA, the
  caches' buffers marked static by their owner), Inductor's caches in minicpmo's cache folder so a second
  process's warm-up reads them back.

One :class:`StepRunner` per decoder (the LLM's, the TTS's), owned by the engine (api/engine.py): no
module-level state. A key carries the generation of the buffers a step writes into (KV slots, caches):
buffers that were reallocated have a new generation, so a graph is never replayed over memory it was not
captured on.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from minicpmo_cli.errors import UsageError, describe_error
from minicpmo_cli.generation.static_cache import CacheRecycler

logger = logging.getLogger(__name__)

STEP_MODES = ("eager", "trace", "graph", "compile")
STEP_ENV = "MINICPMO_STEP"
COMPILE_ENV = "MINICPMO_COMPILE"  # the older switch: 1 -> compile, 0 -> eager
MAX_GRAPHS = 32  # captured graphs kept per runner (buffers of one-off callers, e.g. a TTS utterance, die)
WARMUP_RUNS = 2  # eager runs on a side stream before a capture (cuBLAS / allocator set-up stays out of it)


def resolve_step(mode: str | None, device) -> str:
    """The step mode: ``mode`` when given, else ``MINICPMO_STEP``, else ``MINICPMO_COMPILE`` (1 -> compile,
    0 -> eager), else ``graph`` on CUDA and ``trace`` elsewhere. ``graph`` without CUDA is refused."""
    kind = torch.device(device).type
    if mode is None:
        mode = os.environ.get(STEP_ENV, "").strip().lower() or None
    if mode is None:
        legacy = os.environ.get(COMPILE_ENV, "").strip().lower()
        if legacy in ("1", "true", "yes", "on"):
            mode = "compile"
        elif legacy in ("0", "false", "no", "off"):
            mode = "eager"
    if mode is None:
        return "graph" if kind == "cuda" else "trace"
    mode = str(mode).strip().lower()
    if mode not in STEP_MODES:
        raise UsageError(f"step must be one of {', '.join(STEP_MODES)}, not {mode!r}", parameters=("step",))
    if mode == "graph" and kind != "cuda":
        raise UsageError(f"step graph needs a CUDA GPU (CUDA graphs) and the device is {kind}: use step eager or "
                         "compile", parameters=("step",))
    return mode


def compile_cache_dir() -> Path:
    """Where torch.compile keeps its caches: ``$MINICPMO_HOME/compile``, else the user cache folder."""
    home = os.environ.get("MINICPMO_HOME")
    if home:
        return Path(home).expanduser() / "compile"
    if sys.platform == "win32" and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"]) / "minicpmo" / "compile"
    cache_home = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache_home).expanduser() / "minicpmo" / "compile"


def _use_compile_cache() -> None:
    """Point Inductor's on-disk caches (FX graph, autotuning, Triton kernels) at minicpmo's folder, unless the
    user chose one (torch itself writes its default into the variable on import: that one is replaced)."""
    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current is None or current == _torch_default_cache_dir():
        folder = compile_cache_dir()
        folder.mkdir(parents=True, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)


def _torch_default_cache_dir() -> str | None:
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError:  # another torch layout: leave the variable alone
        return None
    return default_cache_dir()


class _Graph:
    """One captured step: its static inputs, the graph and its output tensor."""

    def __init__(self, fn: Callable, inputs: tuple, fixed: tuple, pool) -> None:
        self.inputs = tuple(x.clone() for x in inputs)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(WARMUP_RUNS):  # a step is idempotent on its buffers: it rewrites the same positions
                fn(*self.inputs, *fixed)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: another thread's CUDA calls (an encoder, a TTS) do not break this thread's capture
        with torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"):
            self.output = fn(*self.inputs, *fixed)

    def replay(self, inputs: tuple) -> torch.Tensor:
        for static, value in zip(self.inputs, inputs):
            static.copy_(value)
        self.graph.replay()
        return self.output.clone()  # the next replay overwrites the output in place


class StepRunner:
    """Runs a step function in the engine's step mode. ``run(key, fn, inputs, fixed)`` calls
    ``fn(*inputs, *fixed)``: ``inputs`` are the tensors that change every step (copied into a graph's
    static inputs), ``fixed`` what a key pins (the model, the buffer lists of the generation in the key)."""

    def __init__(self, mode: str = "eager", name: str = "decode") -> None:
        if mode not in STEP_MODES:
            raise UsageError(f"step mode must be one of {', '.join(STEP_MODES)}, not {mode!r}")
        self.mode, self.name = mode, name
        self._graphs: dict[tuple, _Graph] = {}
        self._compiled: dict[Callable, Callable] = {}
        self._warm: set[tuple] = set()
        self._pool = None
        self._uncapturable: set[tuple] = set()
        self.recycler = CacheRecycler()  # one-caller caches (TTS utterances) reused with their graphs

    @property
    def static_shapes(self) -> bool:
        """Whether steps must keep fixed shapes (the whole capacity, a mask): true for graph and compile."""
        return self.mode in ("graph", "compile")

    def run(self, key: tuple, fn: Callable, inputs: tuple, fixed: tuple = ()) -> torch.Tensor:
        if self.mode in ("eager", "trace"):  # trace: only the LLM engine traces (its own step, step_trace.py)
            return fn(*inputs, *fixed)
        if self.mode == "graph":
            if key in self._uncapturable:
                return fn(*inputs, *fixed)
            graph = self._graphs.get(key)
            if graph is None:
                return self._first(key, lambda: self._capture(key, fn, inputs, fixed))
            return graph.replay(inputs)
        compiled = self._compiled.get(fn)
        if compiled is None:
            _use_compile_cache()
            device = next((x.device for x in inputs if isinstance(x, torch.Tensor)), torch.device("cpu"))
            mode = "reduce-overhead" if device.type == "cuda" else None
            compiled = self._compiled[fn] = torch.compile(fn, mode=mode, fullgraph=True, dynamic=False)
        if key in self._warm:
            return compiled(*inputs, *fixed).clone()
        return self._first(key, lambda: compiled(*inputs, *fixed).clone())

    def _capture(self, key: tuple, fn: Callable, inputs: tuple, fixed: tuple) -> torch.Tensor:
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        while len(self._graphs) >= MAX_GRAPHS:  # the oldest first: callers with short-lived buffers
            oldest = next(iter(self._graphs))
            del self._graphs[oldest]
            self._warm.discard(oldest)
        try:
            graph = _Graph(fn, inputs, fixed, self._pool)
        except RuntimeError as exc:  # a layer kind that syncs with the host (some quantized kernels)
            logger.warning("the %s step cannot be captured as a CUDA graph (%s); it runs eagerly, with the same "
                           "fixed shapes", self.name, describe_error(exc))
            self._uncapturable.add(key)
            return fn(*inputs, *fixed)
        self._graphs[key] = graph
        return graph.replay(inputs)

    def _first(self, key: tuple, call: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The first call of a key: timed and logged (the capture or compile warm-up)."""
        started = time.perf_counter()
        out = call()
        self._warm.add(key)
        verb = "captured" if self.mode == "graph" else "compiled"
        logger.info("%s the %s step for %s in %.2f s", verb, self.name, _describe(key), time.perf_counter() - started)
        return out

    def forget(self, generation: int) -> None:
        """Drop the graphs captured over buffers of ``generation`` (they were replaced by new ones)."""
        for key in [k for k in self._graphs if generation in k[-1:]]:
            del self._graphs[key]
        self._warm = {k for k in self._warm if generation not in k[-1:]}

    @property
    def captured(self) -> int:
        return len(self._graphs)


def _describe(key: tuple) -> str:
    names = ("batch", "cache", "buffers")
    return ", ".join(f"{name} {value}" for name, value in zip(names, key))
