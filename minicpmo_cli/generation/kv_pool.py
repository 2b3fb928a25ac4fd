"""KV slots: a pool of fixed key/value rows for the LLM, one row (slot) per running request.

Per layer one key and one value buffer ``[slots, kv_heads, capacity, head_dim]``; a host-side length per slot
(how many positions of that slot are filled). Each row writes its new position at its own index, and the
attention mask of a batch comes from the lengths. A finished request gives its slot back (:meth:`free`) and
the next request is prefilled straight into it while the other slots keep their state: nothing is copied and
nothing is reallocated, so a CUDA graph captured over the buffers stays valid for the pool's lifetime.

Growth (more slots, or a longer capacity than the pool was made with) is a new pool with the next bucket
(:meth:`grown`): new buffers, the filled positions copied over, a new :attr:`generation` so that a runner
never replays a graph captured over the old buffers. Capacities come from ``bucket_length`` and slot counts
are powers of two, so a handful of shapes cover every request.
"""

from __future__ import annotations

import itertools

import torch

from minicpmo_cli.generation.static_cache import StaticKV, bucket_length

_GENERATIONS = itertools.count(1)


def slot_bucket(count: int) -> int:
    """Slot counts (and batch sizes of a captured step) are powers of two: 1, 2, 4, 8, ..."""
    return 1 << max(int(count) - 1, 0).bit_length()


class KVPool:
    """Fixed KV slots of every LLM layer plus the filled length of each slot (host ints: the scheduler knows
    them without reading the device)."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        self.keys, self.values = keys, values
        self.lengths = [0] * self.slots
        self.used = [False] * self.slots
        self.generation = next(_GENERATIONS)  # new buffers, new generation: graphs are keyed by it
        self._marked_static = False

    @classmethod
    def empty(cls, config, slots: int, capacity: int, dtype, device) -> KVPool:
        heads = config.num_key_value_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        shape = (int(slots), heads, int(capacity), head_dim)
        layers = config.num_hidden_layers
        return cls([torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)],
                   [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)])

    @property
    def slots(self) -> int:
        return self.keys[0].shape[0]

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    @property
    def free_slots(self) -> int:
        return self.used.count(False)

    def alloc(self) -> int | None:
        """The lowest free slot (kept low so a step covers few slots), marked used with length 0; None when
        every slot is taken."""
        for slot, taken in enumerate(self.used):
            if not taken:
                self.used[slot] = True
                self.lengths[slot] = 0
                return slot
        return None

    def free(self, slot: int) -> None:
        """Give ``slot`` back; its buffers are left as they are (the next prefill overwrites what it needs)."""
        self.used[slot] = False
        self.lengths[slot] = 0

    def span(self) -> int:
        """Slots a batched step covers: up to the highest used one, rounded up to a power of two."""
        top = max((slot for slot, taken in enumerate(self.used) if taken), default=-1) + 1
        return min(slot_bucket(max(top, 1)), self.slots)

    # ----- prompts ------------------------------------------------------------------------------------

    def slot_view(self, slot: int) -> StaticKV:
        """``slot`` as a batch-1 :class:`StaticKV` over the pool's own buffers (views: writes land in the
        pool), filled up to the slot's length; :meth:`sync_view` takes its new length back."""
        keys = [k[slot:slot + 1] for k in self.keys]
        values = [v[slot:slot + 1] for v in self.values]
        return StaticKV(keys, values, self.lengths[slot])

    def sync_view(self, slot: int, view: StaticKV) -> None:
        self.lengths[slot] = view.length

    # ----- decode steps -------------------------------------------------------------------------------

    def write_rows(self, layer: int, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        """Store one new position per row: ``keys`` / ``values`` ``[B, H, 1, D]`` of slots ``[0, B)`` at
        ``positions`` ``[B]`` (each row its own index; a scatter, so a captured step replays it)."""
        write_rows(self.keys[layer], self.values[layer], keys, values, positions)

    def mark_static(self) -> None:
        """Tell Dynamo the buffers keep their addresses (once per pool; see StaticKV.mark_static)."""
        if self._marked_static:
            return
        for buffer in (*self.keys, *self.values):
            torch._dynamo.mark_static_address(buffer)
        self._marked_static = True

    # ----- growth -------------------------------------------------------------------------------------

    def fits(self, needed: int) -> bool:
        return needed <= self.capacity

    def grown(self, slots: int, needed: int) -> KVPool:
        """A new pool with at least ``slots`` slots and room for ``needed`` positions per slot, holding this
        pool's state (used slots keep their index, positions and length)."""
        capacity = max(self.capacity, bucket_length(needed))
        slots = max(self.slots, slot_bucket(slots))
        keys0 = self.keys[0]
        pool = KVPool.__new__(KVPool)
        shape = (slots, keys0.shape[1], capacity, keys0.shape[3])
        pool.keys = [keys0.new_zeros(shape) for _ in self.keys]
        pool.values = [keys0.new_zeros(shape) for _ in self.values]
        for new, old in zip((*pool.keys, *pool.values), (*self.keys, *self.values)):
            new[: self.slots, :, : self.capacity] = old
        pool.lengths = self.lengths + [0] * (slots - self.slots)
        pool.used = self.used + [False] * (slots - self.slots)
        pool.generation = next(_GENERATIONS)
        pool._marked_static = False
        return pool


class SlotBuffers:
    """The pool's buffers as a decode step sees them (``keys``, ``values``, :meth:`write_rows`), over tensors
    handed in as arguments: the form a traced step takes them in (generation/step_trace.py)."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        self.keys, self.values = keys, values

    def write_rows(self, layer: int, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        write_rows(self.keys[layer], self.values[layer], keys, values, positions)


def write_rows(key_buffer: torch.Tensor, value_buffer: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               positions: torch.Tensor) -> None:
    batch, heads, _, dim = keys.shape
    index = positions.view(batch, 1, 1, 1).expand(batch, heads, 1, dim)
    key_buffer[:batch].scatter_(2, index, keys)
    value_buffer[:batch].scatter_(2, index, values)


def lengths_mask(lengths: torch.Tensor, span: int) -> torch.Tensor:
    """bool ``[B, 1, 1, span]``: a row whose new token sits at position ``lengths[row]`` attends to
    ``[0, lengths[row]]`` (its own filled positions and the new one)."""
    return window_mask(lengths, torch.arange(span, device=lengths.device))


def window_mask(lengths: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """:func:`lengths_mask` over the key positions ``window`` (``arange(span)``): a traced step takes its span
    from that input's size (generation/step_trace.py)."""
    return (window[None, :] <= lengths[:, None])[:, None, None, :]
