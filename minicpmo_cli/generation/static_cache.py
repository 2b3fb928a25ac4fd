"""A preallocated key/value cache for the Qwen2 LLM: one ``[B, kv_heads, capacity, head_dim]`` buffer per layer.

Capacities are bucketed (:func:`bucket_length`) so that few distinct shapes exist: a captured decode step
(torch.compile / CUDA graphs) is reused for every request that falls in the same bucket. Positions ``[0,
length)`` are filled; all rows share one length (batches are left padded, as transformers pads them).
"""

from __future__ import annotations

import itertools
import weakref
from typing import NamedTuple

import torch

_GENERATIONS = itertools.count(1)

BUCKET = 256  # capacities are multiples of this up to LARGE_BUCKET, then powers of two


def bucket_length(needed: int, step: int = BUCKET) -> int:
    """The smallest bucket that holds ``needed`` positions: 256, 512, ... 2048, then 4096, 8192, ..."""
    needed = max(int(needed), 1)
    if needed <= 8 * step:
        return step * -(-needed // step)
    return 1 << (needed - 1).bit_length()


class LayerView(NamedTuple):
    """The filled part of one layer (what transformers' cache layers expose as ``.keys`` / ``.values``)."""

    keys: torch.Tensor
    values: torch.Tensor


class StaticKV:
    """Key/value buffers of every LLM layer plus the number of filled positions."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], length: int = 0) -> None:
        self.keys, self.values, self.length = keys, values, int(length)
        self._marked_static = False  # see mark_static; new buffers (growth, fewer rows) are unmarked
        self.generation = next(_GENERATIONS)  # new buffers, new generation (a step runner keys graphs by it)

    @classmethod
    def empty(cls, config, batch: int, capacity: int, dtype, device) -> StaticKV:
        heads = config.num_key_value_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        shape = (batch, heads, capacity, head_dim)
        layers = config.num_hidden_layers
        return cls([torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)],
                   [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)])

    @classmethod
    def from_layers(cls, layers, capacity: int) -> StaticKV:
        """Copy a transformers cache's ``.layers`` (each with ``.keys`` / ``.values``) into new buffers."""
        keys, values, length = [], [], 0
        for layer in layers:
            k, v = layer.keys, layer.values
            length = k.shape[2]
            buf_k = k.new_zeros((*k.shape[:2], max(capacity, length), k.shape[3]))
            buf_v = v.new_zeros((*v.shape[:2], max(capacity, length), v.shape[3]))
            buf_k[:, :, :length] = k
            buf_v[:, :, :length] = v
            keys.append(buf_k)
            values.append(buf_v)
        return cls(keys, values, length)

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    @property
    def batch(self) -> int:
        return self.keys[0].shape[0]

    def get_seq_length(self) -> int:
        return self.length

    @property
    def layers(self) -> list[LayerView]:
        return [LayerView(k[:, :, :self.length], v[:, :, :self.length]) for k, v in zip(self.keys, self.values)]

    def ensure_capacity(self, needed: int) -> None:
        """Grow (to the next bucket) when ``needed`` positions do not fit; filled positions are kept."""
        if needed <= self.capacity:
            return
        capacity = bucket_length(needed)
        for buffers in (self.keys, self.values):
            for i, old in enumerate(buffers):
                new = old.new_zeros((*old.shape[:2], capacity, old.shape[3]))
                new[:, :, :self.length] = old[:, :, :self.length]
                buffers[i] = new
        self._marked_static = False
        self.generation = next(_GENERATIONS)

    def write(self, layer: int, keys: torch.Tensor, values: torch.Tensor,
              slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new positions at ``slots`` (``[length, length + n)``, one index tensor shared by all layers)
        of ``layer``; returns that layer's filled part including them (views, no copy). :meth:`advance`
        moves ``length`` once all layers are written."""
        end = self.length + keys.shape[2]
        self.keys[layer].index_copy_(2, slots, keys)
        self.values[layer].index_copy_(2, slots, values)
        return self.keys[layer].narrow(2, 0, end), self.values[layer].narrow(2, 0, end)

    def advance(self, count: int) -> None:
        self.length += int(count)

    def keep_rows(self, index: torch.Tensor) -> None:
        """Keep only the batch rows in ``index`` (finished rows leave the batch)."""
        self.keys = [k.index_select(0, index) for k in self.keys]
        self.values = [v.index_select(0, index) for v in self.values]
        self._marked_static = False
        self.generation = next(_GENERATIONS)

    def mark_static(self) -> None:
        """Tell Dynamo the buffers keep their addresses (as transformers' StaticCache does), once per set of
        buffers: a captured step writes into them in place, and CUDA graphs replay over mutated inputs only
        when they are marked (others are copied in at every replay, or the capture falls back to no graph)."""
        if self._marked_static:
            return
        for buffer in (*self.keys, *self.values):
            torch._dynamo.mark_static_address(buffer)
        self._marked_static = True


class CacheRecycler:
    """Batch-1 caches handed out again (zeroed) once their holder is gone, so the graphs a step runner captured
    over them are replayed for the next holder instead of captured anew (a TTS utterance, then the next).
    At most ``limit`` idle caches are kept per (capacity, dtype, device)."""

    def __init__(self, limit: int = 2) -> None:
        self.limit = limit
        self._idle: dict[tuple, list[StaticKV]] = {}

    def take(self, config, capacity: int, dtype, device, holder: object) -> StaticKV:
        idle = self._idle.get((capacity, dtype, str(torch.device(device))))
        if idle:
            cache = idle.pop()
            for buffer in (*cache.keys, *cache.values):
                buffer.zero_()
            cache.length = 0
        else:
            cache = StaticKV.empty(config, 1, capacity, dtype, device)
        weakref.finalize(holder, self._give_back, cache)
        return cache

    def _give_back(self, cache: StaticKV) -> None:
        key = (cache.capacity, cache.keys[0].dtype, str(cache.keys[0].device))
        idle = self._idle.setdefault(key, [])
        if len(idle) < self.limit:
            idle.append(cache)
